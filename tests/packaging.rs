//! The shipped unit and packages.
//!
//! Always run: the unit's directives, `pointgate --version`.
//!
//! `#[ignore]`d (they need built packages, root and dpkg; `.ci/run deb` builds the
//! packages and runs them with `--ignored`), each given its package by an environment
//! variable:
//! - `PG_DEB_ARM64`: `dpkg-deb` shows the expected files, modes, conffiles and Depends.
//! - `PG_DEB_AMD64`: installs here, `check-config` passes on the shipped config with a
//!   token in place, remove keeps config and state, purge leaves nothing.
//! - `PG_DEB_AMD64` and `PG_DEB_AMD64_NEXT` (a newer version): charges queued by the
//!   installed agent finish after an upgrade. systemd is not PID 1 here, so the agent is
//!   started as the service would run it (user `pointgate`, the shipped paths) and
//!   stopped with SIGTERM, as `systemctl restart` would.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::agent::{charge_text as charge, AgentOpts, STATION};
use common::process::AgentProc;
use common::{MosquittoSub, World};
use pointgate::sim::TerminalMode;
use serde_json::Value;

const UNIT: &str = include_str!("../systemd/pointgate.service");
const WAIT: Duration = Duration::from_secs(60);

/// The values of a `Key=` in the unit (every occurrence, in order).
fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .collect()
}

fn one<'a>(unit: &'a str, key: &str) -> &'a str {
    let v = directive(unit, key);
    assert_eq!(v.len(), 1, "{key}= given {} times", v.len());
    v[0]
}

#[test]
fn the_unit_is_a_notify_service_with_watchdog_restart_and_its_directories() {
    assert_eq!(one(UNIT, "Type"), "notify");
    assert_eq!(one(UNIT, "Restart"), "on-failure");
    assert_eq!(one(UNIT, "RestartPreventExitStatus"), "78");
    assert_eq!(one(UNIT, "StateDirectory"), "pointgate");
    assert_eq!(one(UNIT, "RuntimeDirectory"), "pointgate");
    assert_eq!(one(UNIT, "User"), "pointgate");
    assert_eq!(one(UNIT, "ExecStartPre"), "/usr/bin/pointgate check-config");
    assert_eq!(one(UNIT, "ExecStart"), "/usr/bin/pointgate run");
    assert_eq!(
        one(UNIT, "ConditionPathExists"),
        "/etc/pointgate/access_token"
    );
    let watchdog = humantime::parse_duration(one(UNIT, "WatchdogSec")).expect("WatchdogSec");
    assert!(watchdog >= Duration::from_secs(10), "{watchdog:?}");
    let families: Vec<&str> = one(UNIT, "RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    let mut sorted = families.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["AF_INET", "AF_INET6", "AF_UNIX"]);
}

#[test]
fn the_unit_waits_longer_than_the_agent_drains() {
    let stop = humantime::parse_duration(one(UNIT, "TimeoutStopSec")).expect("TimeoutStopSec");
    // The drain, then up to 5 s for the runtime's leftover tasks (src/main.rs).
    assert!(
        stop > pointgate::DRAIN_TIMEOUT + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} vs drain {:?}",
        pointgate::DRAIN_TIMEOUT
    );
}

#[test]
fn version_shows_the_package_version_and_the_git_revision() {
    let out = Command::new(env!("CARGO_BIN_EXE_pointgate"))
        .arg("--version")
        .output()
        .expect("run pointgate --version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let rev = head.unwrap_or_else(|| "unknown".to_string());
    assert_eq!(
        text,
        format!("pointgate {} ({rev})", env!("CARGO_PKG_VERSION"))
    );
}

// ------------------------------------------------------------- package tests

fn deb_from_env(var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} must name a built .deb (run `.ci/run deb`)"));
    assert!(path.is_file(), "{var}: {} is not a file", path.display());
    path
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Runs and insists on success; returns stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn deb_str(deb: &Path) -> &str {
    deb.to_str().expect("a UTF-8 path")
}

/// `(mode string, owner, path)` from `dpkg-deb -c`.
fn listing(deb: &Path) -> Vec<(String, String, String)> {
    ok("dpkg-deb", &["-c", deb_str(deb)])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                f[5].trim_start_matches('.').to_string(),
            )
        })
        .collect()
}

fn entry<'a>(list: &'a [(String, String, String)], path: &str) -> &'a (String, String, String) {
    list.iter()
        .find(|(_, _, p)| p == path)
        .unwrap_or_else(|| panic!("{path} not in the package: {list:#?}"))
}

#[test]
#[ignore = "needs PG_DEB_ARM64: run `.ci/run deb`"]
fn the_arm64_package_holds_the_binary_unit_conffile_examples_and_depends() {
    let deb = deb_from_env("PG_DEB_ARM64");
    let list = listing(&deb);
    assert_eq!(entry(&list, "/usr/bin/pointgate").0, "-rwxr-xr-x");
    assert!(matches!(
        entry(&list, "/usr/bin/pointgate").1.as_str(),
        "root/root" | "0/0"
    ));
    assert_eq!(
        entry(&list, "/etc/pointgate/pointgate.toml").0,
        "-rw-r--r--"
    );
    let unit = list
        .iter()
        .find(|(_, _, p)| p.ends_with("/systemd/system/pointgate.service"))
        .unwrap_or_else(|| panic!("no unit: {list:#?}"));
    assert_eq!(unit.0, "-rw-r--r--");
    assert_eq!(
        entry(&list, "/usr/share/doc/pointgate/install.md").0,
        "-rw-r--r--"
    );
    // Every broker example of the source tree, under the doc examples.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mosquitto");
    let names: Vec<String> = std::fs::read_dir(&examples)
        .expect("packaging/mosquitto")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.is_empty());
    for name in names {
        entry(
            &list,
            &format!("/usr/share/doc/pointgate/examples/mosquitto/{name}"),
        );
    }
    // No placeholder token: the operator puts the real one in.
    assert!(!list.iter().any(|(_, _, p)| p.contains("access_token")));

    let conffiles = ok("dpkg-deb", &["-I", deb_str(&deb), "conffiles"]);
    assert_eq!(conffiles.trim(), "/etc/pointgate/pointgate.toml");
    let field = |name: &str| {
        ok("dpkg-deb", &["-f", deb_str(&deb), name])
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "pointgate");
    assert_eq!(field("Architecture"), "arm64");
    assert!(field("Version").starts_with(env!("CARGO_PKG_VERSION")));
    let depends = field("Depends");
    assert!(depends.contains("libc6"), "Depends: {depends}");
    assert!(depends.contains("passwd"), "Depends: {depends}");
    assert_eq!(field("Recommends"), "mosquitto");
    // Maintainer scripts: ours, with cargo-deb's systemd snippets in them.
    let postinst = ok("dpkg-deb", &["-I", deb_str(&deb), "postinst"]);
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
    assert!(postinst.contains("_dh_action=restart"), "{postinst}");
    let postrm = ok("dpkg-deb", &["-I", deb_str(&deb), "postrm"]);
    assert!(postrm.contains("purge"), "{postrm}");

    // The binary is for aarch64: ELF e_machine 183 (EM_AARCH64).
    let dir = common::Workdir::new();
    let root = dir.mkdir("root");
    ok(
        "dpkg-deb",
        &["-x", deb_str(&deb), root.to_str().expect("utf-8")],
    );
    let elf = std::fs::read(root.join("usr/bin/pointgate")).expect("read the binary");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183);
}

fn installed() -> bool {
    run("dpkg-query", &["-W", "-f=${Status}", "pointgate"])
        .stdout
        .starts_with(b"install ok installed")
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

fn purge() {
    ok("dpkg", &["--purge", "pointgate"]);
}

fn gid_of(group: &str) -> u32 {
    ok("getent", &["group", group])
        .split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .expect("a gid")
}

fn uid_of(user: &str) -> u32 {
    ok("id", &["-u", user]).trim().parse().expect("a uid")
}

/// Writes a token file as the docs say: root:pointgate, 0640.
fn put_token(path: &Path, token: &str) {
    std::fs::write(path, format!("{token}\n")).expect("write the token");
    ok("chown", &["root:pointgate", path.to_str().expect("utf-8")]);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
}

#[test]
#[ignore = "needs root and PG_DEB_AMD64: run `.ci/run deb`"]
fn the_amd64_package_installs_checks_its_config_removes_and_purges_clean() {
    let deb = deb_from_env("PG_DEB_AMD64");
    purge();
    assert!(
        !Path::new("/etc/pointgate").exists(),
        "left over from before"
    );
    ok("dpkg", &["-i", deb_str(&deb)]);
    assert!(installed());
    assert!(user_exists("pointgate"));

    let etc = std::fs::metadata("/etc/pointgate").expect("/etc/pointgate");
    assert_eq!(etc.mode() & 0o7777, 0o750);
    assert_eq!((etc.uid(), etc.gid()), (0, gid_of("pointgate")));
    let state = std::fs::metadata("/var/lib/pointgate").expect("/var/lib/pointgate");
    assert_eq!(state.mode() & 0o7777, 0o700);
    assert_eq!(state.uid(), uid_of("pointgate"));
    assert!(!Path::new("/etc/pointgate/access_token").exists());
    // Enabled (not started: systemd is not PID 1 here).
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/pointgate.service").exists());

    // Without a token, check-config names the problem (78).
    let out = run("/usr/bin/pointgate", &["check-config"]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    // With one, as the docs say, the shipped config passes: as root and as the service.
    put_token(
        Path::new("/etc/pointgate/access_token"),
        "APP_USR-install-test",
    );
    let out = ok("/usr/bin/pointgate", &["check-config"]);
    assert!(out.contains("configuration ok"), "{out}");
    ok(
        "setpriv",
        &[
            "--reuid=pointgate",
            "--regid=pointgate",
            "--init-groups",
            "/usr/bin/pointgate",
            "check-config",
        ],
    );

    // The installed unit verifies and is hardened (exposure at most 2.0).
    let unit = if Path::new("/usr/lib/systemd/system/pointgate.service").exists() {
        "/usr/lib/systemd/system/pointgate.service"
    } else {
        "/lib/systemd/system/pointgate.service"
    };
    ok("systemd-analyze", &["verify", unit]);
    ok(
        "systemd-analyze",
        &["security", "--offline=yes", "--threshold=20", unit],
    );

    // Remove: config, token, state and user stay.
    ok("dpkg", &["--remove", "pointgate"]);
    assert!(!Path::new("/usr/bin/pointgate").exists());
    assert!(Path::new("/etc/pointgate/pointgate.toml").exists());
    assert!(Path::new("/etc/pointgate/access_token").exists());
    assert!(Path::new("/var/lib/pointgate").exists());
    assert!(user_exists("pointgate"));

    // Purge: nothing left.
    purge();
    for p in [
        "/etc/pointgate",
        "/var/lib/pointgate",
        "/usr/bin/pointgate",
        unit,
    ] {
        assert!(!Path::new(p).exists(), "{p} left after purge");
    }
    assert!(!user_exists("pointgate"));
    assert!(!run("getent", &["group", "pointgate"]).status.success());
    assert!(!run("dpkg-statoverride", &["--list", "/etc/pointgate"])
        .status
        .success());
    assert!(!installed());
}

/// The installed agent as the unit runs it: user pointgate, the shipped config path.
fn start_installed_agent(dir: &common::Workdir, name: &str) -> AgentProc {
    // setpriv execs the agent (no parent in between): SIGTERM reaches it directly.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=pointgate",
        "--regid=pointgate",
        "--init-groups",
        "/usr/bin/pointgate",
        "run",
    ]);
    for var in [
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info");
    let mut agent = AgentProc::new(
        "/etc/pointgate/pointgate.toml",
        dir.join(format!("{name}.log")),
    );
    agent.spawn_command(cmd);
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, PG_DEB_AMD64 and PG_DEB_AMD64_NEXT: run `.ci/run deb`"]
async fn charges_queued_before_an_upgrade_finish_after_it() {
    let deb = deb_from_env("PG_DEB_AMD64");
    let next = deb_from_env("PG_DEB_AMD64_NEXT");
    purge();
    ok("dpkg", &["-i", deb_str(&deb)]);

    // Terminals that wait: the charges stay open until the test moves them.
    let token = "APP_USR-upgrade-test-token";
    let World { broker, agent, .. } = World::builder()
        .agent(AgentOpts {
            state_dir: Some(PathBuf::from("/var/lib/pointgate")),
            ..AgentOpts::single(TerminalMode::Manual, token)
        })
        .setup_only()
        .start()
        .await;
    let (broker, setup) = (broker.expect("a broker"), agent);
    // The shipped paths: config, token and CA under /etc/pointgate, state in /var/lib.
    let ca = Path::new("/etc/pointgate/sim-ca.pem");
    std::fs::copy(setup.dir.join("sim-ca.pem"), ca).expect("copy the CA");
    std::fs::set_permissions(ca, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    put_token(Path::new("/etc/pointgate/access_token"), token);
    std::fs::write(
        "/etc/pointgate/pointgate.toml",
        setup.render_config_with_files(Path::new("/etc/pointgate/access_token"), ca),
    )
    .expect("edit the conffile");
    ok("/usr/bin/pointgate", &["check-config"]);

    let evt = setup.evt_topic(STATION);
    let status = setup.status_topic();
    let mut sub = MosquittoSub::start(broker.port(), &[evt.as_str(), status.as_str()]);
    let mut agent = start_installed_agent(&setup.dir, "before");
    sub.wait_for(|m| m.topic == status && m.payload.contains("online"), WAIT);
    common::mosquitto_pub(
        broker.port(),
        &setup.cmd_topic(STATION),
        charge("up-1", "15"),
    );
    common::mosquitto_pub(
        broker.port(),
        &setup.cmd_topic(STATION),
        charge("up-2", "16"),
    );
    // up-1 is on the terminal (its intent created), up-2 waits behind it.
    sub.wait_for(
        |m| m.topic == evt && m.payload.contains("up-1") && m.payload.contains(r#""state":"sent""#),
        WAIT,
    );
    let up2_accepted = |m: &common::SubMsg| {
        m.topic == evt && m.payload.contains("up-2") && m.payload.contains("accepted")
    };
    if !sub.seen().iter().any(up2_accepted) {
        sub.wait_for(up2_accepted, WAIT);
    }
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}; log:\n{}", agent.log());
    assert!(!sub
        .seen()
        .iter()
        .any(|m| m.payload.contains(r#""final":true"#)));

    // Upgrade. The edited conffile stays (the package's copy did not change).
    ok("dpkg", &["-i", "--force-confold", deb_str(&next)]);
    let version = ok("dpkg-query", &["-W", "-f=${Version}", "pointgate"]);
    let next_version = ok("dpkg-deb", &["-f", deb_str(&next), "Version"]);
    assert_eq!(version.trim(), next_version.trim());
    assert!(std::fs::read_to_string("/etc/pointgate/pointgate.toml")
        .expect("config")
        .contains(&setup.sim.base_url()));

    let mut agent = start_installed_agent(&setup.dir, "after");
    setup.sim.set_terminal_mode(TerminalMode::Auto {
        pickup: Duration::from_millis(50),
        process: Duration::from_millis(50),
    });
    let mut finals: Vec<Value> = Vec::new();
    for id in ["up-1", "up-2"] {
        let m = sub.wait_for(
            |m| m.topic == evt && m.payload.contains(id) && m.payload.contains(r#""final":true"#),
            WAIT,
        );
        finals.push(serde_json::from_str(&m.payload).expect("json"));
    }
    for v in &finals {
        assert_eq!(v["state"], "approved", "{v}");
    }
    // Exactly one payment intent per charge: nothing created twice over the restart.
    assert_eq!(setup.sim.ledger().len(), 2, "{:?}", setup.sim.ledger());
    assert!(setup.sim.duplicated_references().is_empty());
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}; log:\n{}", agent.log());
    purge();
    assert!(!Path::new("/var/lib/pointgate").exists());
}
