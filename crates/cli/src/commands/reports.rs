//! `memwise report`: work with report folders (`memwise run --report DIR` writes them).

use std::path::PathBuf;

use anyhow::Context as _;

/// Options for `memwise report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Put two report folders side by side: process peaks, and per stage or scope its runs,
    /// time and peak, with the difference (B - A).
    Compare {
        /// The first report folder.
        a: PathBuf,
        /// The second report folder.
        b: PathBuf,
        /// Also draw the comparison as one SVG here (bars of A and B per figure).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
}

/// Runs the chosen `report` subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Compare { a, b, svg } => {
            let comparison = memwise::report::compare(&a, &b)
                .with_context(|| format!("comparing {} with {}", a.display(), b.display()))?;
            print!("{comparison}");
            if let Some(path) = svg {
                let drawing = comparison.to_svg()?;
                std::fs::write(&path, drawing)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("drew {}", path.display());
            }
            Ok(())
        }
    }
}
