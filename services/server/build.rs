//! Records the git commit the binary is built from, for `beseda_build_info`
//! and `--version` readers; "unknown" outside a git checkout (a source
//! tarball, a Docker context without .git).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    // Not under the BESEDA_ prefix: `cargo run` and `cargo test` also put
    // this variable into the environment of what they start, and the server
    // refuses unknown BESEDA_* settings.
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    // A new commit moves HEAD or the branch it points at.
    let git_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.git");
    for watched in ["HEAD", "refs/heads"] {
        let path = git_dir.join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
