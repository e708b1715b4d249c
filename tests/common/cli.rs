//! The real `pointgate` binary as a command-line user runs it, from async tests.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::Command;

/// What a command did.
#[derive(Debug)]
pub struct Run {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout and stderr together, for messages and leak checks.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `pointgate ARGS...` to its end (on a blocking thread, so the test's runtime
/// keeps serving the in-process agent meanwhile). `POINTGATE_*` and `RUST_LOG` of the
/// test's environment are not passed on.
pub async fn pointgate<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pointgate"));
        cmd.args(&args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("POINTGATE_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().expect("run pointgate");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("the command's thread joins")
}
