//! The flag tables in the docs and `--help` agree: every flag of every subcommand has a row
//! naming its environment variable and its default, as clap defines them, and every number or
//! duration flag has an allowed range that its row states. A default or range changed in code
//! without the docs (or the reverse) fails here.

use clap::{CommandFactory, Parser};
use imds_broker::cli::Cli;
use std::any::TypeId;
use std::path::Path;
use std::time::Duration;

/// The table rows `| `--flag` | `ENV` | default | ... |` of `doc`, split into cells: all of
/// them, or those of the section that starts at the line beginning with `section`.
fn rows(doc: &str, section: Option<&str>) -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let lines: Vec<&str> = match section {
        None => text.lines().collect(),
        Some(start) => text
            .lines()
            .skip_while(|l| !l.starts_with(start))
            .enumerate()
            .take_while(|(i, l)| *i == 0 || !l.starts_with('#'))
            .map(|(_, l)| l)
            .collect(),
    };
    assert!(!lines.is_empty(), "{doc}: no section {section:?}");
    lines
        .into_iter()
        .filter(|l| l.trim_start().starts_with("| `--"))
        .map(|l| {
            l.trim()
                .split(" | ")
                .map(|c| c.trim_matches('|').trim().to_owned())
                .collect()
        })
        .collect()
}

/// The first `backticked` value of a cell.
fn first_code(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(&cell[start..start + len])
}

/// Whether a flag's value is a number or a duration: those need an allowed range.
fn is_number_or_duration(arg: &clap::Arg) -> bool {
    let id = arg.get_value_parser().type_id();
    [
        TypeId::of::<Duration>(),
        TypeId::of::<usize>(),
        TypeId::of::<u64>(),
        TypeId::of::<u32>(),
        TypeId::of::<u16>(),
        TypeId::of::<i64>(),
    ]
    .iter()
    .any(|t| id == *t)
}

/// The range (`1s–5m`) that the flag's parser states when given values outside any range, as
/// a user would see it.
fn stated_range(subcommand: &str, long: &str) -> Option<String> {
    let required: &[&str] = match subcommand {
        "serve" => &["--emulate"],
        "node" => &[
            "--emulate",
            "--node-name",
            "n",
            "--listen",
            "127.0.0.1:1",
            "--identity-header",
            "x",
        ],
        "webhook" | "inject" => &["--sidecar-image", "i"],
        _ => &[],
    };
    let flag = format!("--{long}");
    ["0", "0ns", "99999999999999999999", "100000000h"]
        .iter()
        .find_map(|probe| {
            let mut argv = vec!["imds-broker", subcommand];
            argv.extend_from_slice(required);
            argv.extend([flag.as_str(), probe]);
            let text = Cli::try_parse_from(argv).err()?.to_string();
            let start = text.find("allowed range ")? + "allowed range ".len();
            let range = text[start..].split_whitespace().next()?;
            Some(range.trim_end_matches([';', ',']).to_owned())
        })
}

fn check(subcommand: &str, doc: &str, section: Option<&str>) {
    check_rows(subcommand, doc, &rows(doc, section));
}

/// Checks `subcommand`'s flags against `table` (the first row naming a flag counts).
fn check_rows(subcommand: &str, doc: &str, table: &[Vec<String>]) {
    let mut cli = Cli::command();
    cli.build();
    let cmd = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    let mut problems = Vec::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") || arg.is_global_set() {
            continue;
        }
        let flag = format!("`--{long}`");
        let Some(row) = table.iter().find(|r| r[0].starts_with(&flag)) else {
            problems.push(format!("{doc}: no row for --{long}"));
            continue;
        };
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            if first_code(&row[1]) != Some(&*env) {
                problems.push(format!("--{long}: env is {env}, the doc says {}", row[1]));
            }
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if is_number_or_duration(arg) {
            match stated_range(subcommand, long) {
                None => problems.push(format!(
                    "--{long} states no allowed range (a number or duration needs one)"
                )),
                Some(range) if !row.get(3).is_some_and(|m| m.contains(&range)) => {
                    problems.push(format!("--{long} allows {range}; its doc row says {row:?}"))
                }
                Some(_) => {}
            }
        }
        let cell = &row[2];
        match defaults.as_slice() {
            // No default (or an empty one): the doc must not show a value.
            [] => {
                if cell.starts_with('`') {
                    problems.push(format!("--{long} has no default; the doc says {cell}"));
                }
            }
            [d] if d.is_empty() => {
                if cell.starts_with('`') {
                    problems.push(format!("--{long} has no default; the doc says {cell}"));
                }
            }
            [d] if d == "false" => {
                if cell != "off" {
                    problems.push(format!("--{long} is off by default; the doc says {cell}"));
                }
            }
            [d] => {
                if first_code(cell) != Some(d.as_str()) {
                    problems.push(format!("--{long} defaults to {d}; the doc says {cell}"));
                }
            }
            many => {
                let shown = many.join(",");
                if !cell.starts_with("the ") && first_code(cell) != Some(shown.as_str()) {
                    problems.push(format!("--{long} defaults to {shown}; the doc says {cell}"));
                }
            }
        }
    }
    // And no row for a flag that does not exist.
    for row in table {
        let long = first_code(&row[0])
            .unwrap_or_default()
            .trim_start_matches("--");
        if cmd.get_arguments().all(|a| a.get_long() != Some(long)) {
            problems.push(format!(
                "{doc}: a row for --{long}, which {subcommand} does not have"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn serve_flags_match_the_readme() {
    check("serve", "README.md", Some("### `serve` flags"));
}

#[test]
fn node_flags_match_the_readme() {
    // Its own rows (and the two it changes) first, then serve's for the flags it shares.
    let mut table = rows("README.md", Some("### `node` flags"));
    table.extend(rows("README.md", Some("### `serve` flags")));
    check_rows("node", "README.md", &table);
}

#[test]
fn webhook_flags_match_the_guide() {
    check("webhook", "docs/velero-on-aks.md", None);
}

#[test]
fn init_network_flags_match_transparent_mode() {
    check("init-network", "docs/transparent-mode.md", None);
    check("init-network", "README.md", Some("| `init-network` flag"));
}

#[test]
fn velero_env_flags_match_the_node_mode_guide() {
    check(
        "velero-env",
        "docs/node-mode-install.md",
        Some("## `velero-env` flags"),
    );
}
