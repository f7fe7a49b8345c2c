//! The Helm chart starts blockvol-agent with flags the binary really has.

use std::path::Path;

#[test]
fn chart_args_are_flags_the_binary_accepts() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    e2e::chart::assert_chart_args_accepted(
        &repo,
        "blockvol-agent",
        env!("CARGO_BIN_EXE_blockvol-agent"),
        2, // the agent and the attach launcher
    );
}
