//! The `pointgate` binary as an operator meets it: exit codes (0, 64, 78), messages that
//! name the key at fault, `--version`, and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

const EX_USAGE: i32 = 64;
const EX_CONFIG: i32 = 78;

/// The binary, with none of the caller's `POINTGATE_*` or `RUST_LOG` settings.
fn pointgate(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pointgate"));
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("POINTGATE_") || key_text == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args);
    cmd
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pointgate.toml")
}

/// A scratch directory with a token file of the given mode and a queue directory, and
/// the variables that point the configuration at them.
struct Scratch {
    dir: TempDir,
    token: PathBuf,
}

impl Scratch {
    fn new(token_mode: u32) -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("access_token");
        std::fs::write(&token, "APP_USR-0000-test\n").expect("write token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(token_mode))
            .expect("chmod token");
        std::fs::create_dir(dir.path().join("queue")).expect("queue dir");
        Scratch { dir, token }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = pointgate(args);
        cmd.env("POINTGATE_POINT_ACCESS_TOKEN_FILE", &self.token);
        cmd.env("POINTGATE_QUEUE_DIR", self.dir.path().join("queue"));
        cmd
    }

    fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("pointgate.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

fn check_config(scratch: &Scratch, config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = scratch.command(&["check-config", "--config"]);
    cmd.arg(config);
    cmd.envs(env.iter().copied());
    cmd.output().expect("run pointgate")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let scratch = Scratch::new(0o600);
    let out = check_config(&scratch, &shipped_config(), &[]);
    assert_exit(&out, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
}

#[test]
fn check_config_finds_the_file_through_pointgate_config() {
    let scratch = Scratch::new(0o600);
    let good = scratch
        .command(&["check-config"])
        .env("POINTGATE_CONFIG", shipped_config())
        .output();
    assert_exit(&good.expect("run"), 0);
    let missing = scratch.dir.path().join("absent.toml");
    let bad = scratch
        .command(&["check-config"])
        .env("POINTGATE_CONFIG", &missing)
        .output();
    let bad = bad.expect("run");
    assert_exit(&bad, EX_CONFIG);
    assert!(stderr(&bad).contains("absent.toml"), "{}", stderr(&bad));
}

#[test]
fn check_config_refuses_an_unknown_key_naming_it() {
    let scratch = Scratch::new(0o600);
    let config = scratch.write_config("[store]\nid = \"s1\"\n[point]\npol_interval = \"2s\"\n");
    let out = check_config(&scratch, &config, &[]);
    assert_exit(&out, EX_CONFIG);
    assert!(
        stderr(&out).contains("unknown key `point.pol_interval`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_refuses_an_environment_override_out_of_range_naming_it() {
    let scratch = Scratch::new(0o600);
    let ok = check_config(
        &scratch,
        &shipped_config(),
        &[("POINTGATE_POINT_POLL_INTERVAL", "500ms")],
    );
    assert_exit(&ok, 0);
    let out = check_config(
        &scratch,
        &shipped_config(),
        &[("POINTGATE_POINT_POLL_INTERVAL", "50ms")],
    );
    assert_exit(&out, EX_CONFIG);
    let message = stderr(&out);
    assert!(
        message.contains("point.poll_interval: 50ms is below 100ms"),
        "{message}"
    );
    assert!(
        message.contains("POINTGATE_POINT_POLL_INTERVAL"),
        "{message}"
    );
}

#[test]
fn check_config_refuses_a_terminal_bound_to_two_stations_naming_both() {
    let scratch = Scratch::new(0o600);
    let config = scratch.write_config(
        "[store]\nid = \"s1\"\n\
         [stations.kiosk-01]\nterminals = [\"PAX_1\"]\n\
         [stations.lane-7]\nterminals = [\"PAX_1\"]\n",
    );
    let out = check_config(&scratch, &config, &[]);
    assert_exit(&out, EX_CONFIG);
    let message = stderr(&out);
    assert!(
        message.contains("kiosk-01") && message.contains("lane-7"),
        "{message}"
    );
}

#[test]
fn check_config_refuses_a_token_file_others_can_read_or_write() {
    for mode in [0o644, 0o604, 0o620, 0o602] {
        let scratch = Scratch::new(mode);
        let out = check_config(&scratch, &shipped_config(), &[]);
        assert_exit(&out, EX_CONFIG);
        assert!(
            stderr(&out).contains("point.access_token_file"),
            "{mode:o}: {}",
            stderr(&out)
        );
    }
    // Group-readable is allowed: the service may read it through its group.
    assert_exit(
        &check_config(&Scratch::new(0o640), &shipped_config(), &[]),
        0,
    );
}

#[test]
fn check_config_refuses_a_missing_token_file() {
    let scratch = Scratch::new(0o600);
    let absent = scratch.dir.path().join("no-token");
    let env = [(
        "POINTGATE_POINT_ACCESS_TOKEN_FILE",
        absent.to_str().expect("utf-8"),
    )];
    let out = check_config(&scratch, &shipped_config(), &env);
    assert_exit(&out, EX_CONFIG);
    assert!(
        stderr(&out).contains("point.access_token_file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_refuses_a_missing_file() {
    let scratch = Scratch::new(0o600);
    let out = check_config(&scratch, &scratch.dir.path().join("absent.toml"), &[]);
    assert_exit(&out, EX_CONFIG);
    assert!(stderr(&out).contains("absent.toml"), "{}", stderr(&out));
}

#[test]
fn run_refuses_a_bad_configuration_before_starting() {
    let scratch = Scratch::new(0o600);
    let config = scratch.write_config("[store]\nid = \"S 1\"\n");
    let out = scratch
        .command(&["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_exit(&out, EX_CONFIG);
    assert!(stderr(&out).contains("store.id"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_exit(&pointgate(&["frobnicate"]).output().expect("run"), EX_USAGE);
    assert_exit(&pointgate(&[]).output().expect("run"), EX_USAGE);
    assert_exit(
        &pointgate(&["check-config", "--bogus"])
            .output()
            .expect("run"),
        EX_USAGE,
    );
    assert_exit(
        &pointgate(&["sim", "--site", "XX"]).output().expect("run"),
        EX_USAGE,
    );
    let help = pointgate(&["--help"]).output().expect("run");
    assert_exit(&help, 0);
    assert!(String::from_utf8_lossy(&help.stdout).contains("check-config"));
}

#[test]
fn version_prints_the_version_and_the_git_revision() {
    let out = pointgate(&["--version"]).output().expect("run");
    assert_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = format!("pointgate {} (", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&expected), "{text}");
    let rev = text
        .trim()
        .trim_start_matches(&expected)
        .trim_end_matches(')');
    assert!(!rev.is_empty() && !rev.contains(' '), "{text}");
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    const WAIT: Duration = Duration::from_secs(30);
    let scratch = Scratch::new(0o600);
    let mut child = scratch
        .command(&["run", "--config"])
        .arg(shipped_config())
        .env("POINTGATE_LOG_LEVEL", "debug")
        // Nothing to reach: the agent must stop on SIGTERM whatever it is waiting for.
        .env("POINTGATE_POINT_BASE_URL", "https://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");

    // Each stderr line, then `None` at end of file (the process has exited).
    let (lines_tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(Some(line));
        }
        let _ = lines_tx.send(None);
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(WAIT) {
            Ok(Some(line)) if line.contains("signal handlers installed") => break,
            Ok(Some(line)) => seen.push(line),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                panic!("the agent did not get ready: {seen:#?}");
            }
        }
    }

    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(kill.expect("kill").success());
    loop {
        match lines.recv_timeout(WAIT) {
            Ok(Some(line)) => seen.push(line),
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                panic!("the agent did not stop within {WAIT:?}: {seen:#?}");
            }
        }
    }
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("shutdown requested")),
        "{seen:#?}"
    );
}
