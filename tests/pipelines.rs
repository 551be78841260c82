//! Table-driven validation tests: every `tests/pipelines/valid-*.yaml` must compile with no
//! errors; every `invalid-*.yaml` must produce exactly the errors its `# expect-error LINE: text`
//! comments list (each at that line, with that text in its message or help), and no others.

use std::fs;
use std::path::PathBuf;

fn cases(prefix: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".yaml")
        })
        .collect();
    v.sort();
    assert!(
        !v.is_empty(),
        "no {prefix}*.yaml cases in {}",
        dir.display()
    );
    v
}

#[test]
fn should_accept_every_valid_pipeline() {
    let reg = nodes::registry();
    for path in cases("valid-") {
        if let Err(d) = runner::load(&path, &[], &reg) {
            panic!("{} should be valid but:\n{d}", path.display());
        }
    }
}

#[test]
fn should_report_every_expected_error_of_invalid_pipelines() {
    let reg = nodes::registry();
    for path in cases("invalid-") {
        let text = fs::read_to_string(&path).unwrap();
        let expected: Vec<(u32, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect-error "))
            .map(|rest| {
                let (line, msg) = rest.split_once(": ").expect("`# expect-error LINE: text`");
                (line.parse().unwrap(), msg.to_string())
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no expectations",
            path.display()
        );
        let diags = match runner::load(&path, &[], &reg) {
            Ok(_) => panic!("{} should be invalid", path.display()),
            Err(d) => d,
        };
        let rendered = diags.to_string();
        let errors: Vec<_> = diags.errors().collect();
        for (line, msg) in &expected {
            let found = errors.iter().any(|d| {
                let full = match &d.help {
                    Some(h) => format!("{} ({h})", d.message),
                    None => d.message.clone(),
                };
                d.loc.line == *line && full.contains(msg.as_str())
            });
            assert!(
                found,
                "{}: expected error at line {line}: {msg}\ngot:\n{rendered}",
                path.display()
            );
        }
        assert_eq!(
            errors.len(),
            expected.len(),
            "{}: unexpected extra errors:\n{rendered}",
            path.display()
        );
        // Every error names the file.
        for d in &errors {
            assert!(d.position().starts_with(&path.display().to_string()), "{d}");
        }
    }
}
