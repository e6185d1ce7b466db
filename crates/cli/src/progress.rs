//! Progress bars on stderr, hidden when stderr is not a terminal (CI, pipes, `--json` scripts).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

const STEPS: &str = "{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})";
const BYTES: &str = "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({elapsed}<{eta})";

/// A bar over `len` steps labelled `label`; invisible unless stderr is a terminal and `enabled`.
pub fn bar(len: u64, label: &str, enabled: bool) -> ProgressBar {
    styled(len, label, enabled, STEPS)
}

/// [`bar`] over `len` bytes, shown as sizes and a rate (downloads, checksums).
pub fn bytes_bar(len: u64, label: &str, enabled: bool) -> ProgressBar {
    styled(len, label, enabled, BYTES)
}

fn styled(len: u64, label: &str, enabled: bool, template: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    pb.set_prefix(label.to_string());
    pb
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_templates_parse() {
        // They are only used on a terminal, which tests do not have: check them here.
        for template in [super::STEPS, super::BYTES] {
            assert!(indicatif::ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }
}
