//! `memwise config`: show the configuration in force and where each value came from, or
//! check a configuration file.

use std::path::PathBuf;

use anyhow::bail;
use memwise::config;

/// Options for `memwise config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Print the configuration built from the defaults, the file (`--file` or
    /// MEMWISE_CONFIG) and the MEMWISE_* environment.
    Show {
        /// Say where each value came from: default, file, environment variable or code.
        #[arg(long)]
        origin: bool,
        /// Print JSON instead of `key = value` lines.
        #[arg(long)]
        json: bool,
        /// Load this TOML or JSON file instead of the one MEMWISE_CONFIG names.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Check a TOML or JSON configuration file on its own (the environment is left out)
    /// and list every problem in it.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Runs `memwise config show` or `memwise config check`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Show { origin, json, file } => {
            let builder = match file {
                Some(file) => config::Builder::new().file(file),
                None => config::Builder::new(),
            };
            let resolved = builder.build()?;
            let text = match (json, origin) {
                (true, true) => serde_json::to_string_pretty(&resolved.entries())?,
                (true, false) => resolved.config().to_json(),
                (false, with_origin) => render(&resolved.entries(), with_origin),
            };
            println!("{}", text.trim_end());
            Ok(())
        }
        Action::Check { file } => {
            let checked = config::Builder::new()
                .env_from(std::iter::empty::<(String, String)>())
                .file(&file)
                .check();
            match checked {
                Ok(resolved) => {
                    let set = resolved
                        .entries()
                        .iter()
                        // config_path is recorded from the file's name, not set in it.
                        .filter(|e| e.key != "config_path")
                        .filter(|e| matches!(e.origin, memwise::config::Source::File(_)))
                        .count();
                    println!("{}: ok ({set} key(s) set)", file.display());
                    Ok(())
                }
                Err(errors) => {
                    for err in &errors {
                        eprintln!("{err}");
                    }
                    bail!("{} problem(s) in {}", errors.len(), file.display())
                }
            }
        }
    }
}

/// `key = value` lines, TOML-style, with the origin as a trailing comment when asked.
fn render(entries: &[config::Entry], with_origin: bool) -> String {
    let lines: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            let value = e
                .value
                .as_ref()
                .map_or("(unset)".to_owned(), |v| v.to_string());
            let key = if e.key.contains(':') {
                // TOML needs quotes around a key segment with a colon ("cuda:0").
                match e.key.rsplit_once('.') {
                    Some((table, device)) => format!("{table}.\"{device}\""),
                    None => e.key.clone(),
                }
            } else {
                e.key.clone()
            };
            (format!("{key} = {value}"), e.origin.to_string())
        })
        .collect();
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (line, origin) in lines {
        if with_origin {
            out.push_str(&format!("{line:<width$}  # {origin}\n"));
        } else {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}
