//! `isdp-fuzz`: the stable harness from the command line, for runs longer
//! than CI's (see fuzz/README.md).
//!
//! ```text
//! isdp-fuzz run <target>|all [--seconds N] [--seed N]
//! isdp-fuzz replay <target> <file>...
//! isdp-fuzz seeds            (writes the generated seeds into fuzz/corpus/)
//! isdp-fuzz list
//! ```

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{Context, bail};
use isdp_fuzz::{run, targets};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name}: not a number")),
            None => Ok(default),
        }
    };
    match args.first().map(String::as_str) {
        Some("run") => {
            let which = args.get(1).context("run: which target (or all)?")?;
            let seconds = flag("--seconds", 60)?;
            let seed = flag("--seed", 1)?;
            let chosen: Vec<&'static targets::Target> = if which == "all" {
                targets::ALL.iter().collect()
            } else {
                vec![targets::by_name(which).with_context(|| format!("no target {which}"))?]
            };
            for t in chosen {
                match run::run(t, Duration::from_secs(seconds), None, seed) {
                    Ok(r) => println!(
                        "{}: {} inputs ({} seeds) in {:.1?}, no crash",
                        r.target, r.runs, r.seeds, r.elapsed
                    ),
                    Err(crash) => bail!("{crash}"),
                }
            }
        }
        Some("replay") => {
            let name = args.get(1).context("replay: which target?")?;
            let t = targets::by_name(name).with_context(|| format!("no target {name}"))?;
            for path in &args[2..] {
                let input = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                match run::run_one(t, &input) {
                    Ok(()) => println!("{path}: ok"),
                    Err(m) => bail!("{path}: {m}"),
                }
            }
        }
        Some("seeds") => {
            for t in targets::ALL {
                let dir = run::corpus_dir(t);
                std::fs::create_dir_all(&dir)?;
                for (name, bytes) in (t.seeds)() {
                    std::fs::write(dir.join(name), bytes)?;
                }
            }
        }
        Some("list") => {
            for t in targets::ALL {
                println!("{}", t.name);
            }
        }
        _ => bail!(
            "usage: isdp-fuzz run <target>|all [--seconds N] [--seed N] | replay <target> <file>... | seeds | list"
        ),
    }
    Ok(())
}
