//! Stamps the binary with the git revision it was built from: `PG_GIT_REV`, shown by
//! `pointgate --version`. A packager building outside a checkout (a source tarball, a
//! cross container without git) may set `PG_GIT_REV` itself; otherwise it is "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PG_GIT_REV");
    let rev = match std::env::var("PG_GIT_REV") {
        Ok(rev) if !rev.trim().is_empty() => rev.trim().to_string(),
        _ => git_revision().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=PG_GIT_REV={rev}");
}

/// The short revision of HEAD, when this crate is a git checkout (not merely inside
/// one) and git answers. Asks cargo to build again when HEAD moves.
fn git_revision() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // `.git` is a directory in a clone and a file in a worktree.
    if !dir.join(".git").exists() {
        return None;
    }
    // HEAD names the branch; the branch's ref (loose or packed) moves on each commit.
    let mut watched = vec![git(&dir, &["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&dir, &["rev-parse", "--git-path", &branch]));
        watched.push(git(&dir, &["rev-parse", "--git-path", "packed-refs"]));
    }
    for path in watched.into_iter().flatten() {
        let path = dir.join(path);
        // A path that does not exist would make cargo run this script on every build.
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&dir, &["rev-parse", "--short", "HEAD"])
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}
