//! The stable harness: every seed of a target's corpus, then mutations of
//! them until the time budget is spent, from one seed of the generator so
//! a run can be repeated. The first input that panics (on any thread) or
//! fails an assertion ends the run; it is written out for replay.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::mutate::{Rng, mutate};
use crate::targets::Target;

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    /// Inputs run, seeds included.
    pub runs: u64,
    pub seeds: usize,
    pub elapsed: Duration,
}

/// The input that failed, and why.
#[derive(Debug)]
pub struct Crash {
    pub target: &'static str,
    pub message: String,
    pub input: Vec<u8>,
    /// Where the input was written, for `isdp-fuzz replay`.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({} bytes{})\ninput: {:?}",
            self.target,
            self.message,
            self.input.len(),
            self.saved
                .as_ref()
                .map(|p| format!(", saved as {}", p.display()))
                .unwrap_or_default(),
            String::from_utf8_lossy(&self.input[..self.input.len().min(512)]),
        )
    }
}

/// The corpus folder of `target`: `fuzz/corpus/<name>`.
pub fn corpus_dir(target: &Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target.name)
}

/// Every file of the target's corpus, in name order.
pub fn corpus(target: &Target) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// The last panic's message, from whichever thread panicked.
static PANICKED: Mutex<Option<String>> = Mutex::new(None);

/// Records panics instead of printing them (once per process); the run
/// reports the first.
fn hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let mut slot = PANICKED.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                let thread = std::thread::current().name().unwrap_or("?").to_owned();
                *slot = Some(format!("panic on thread {thread}: {info}"));
            }
        }));
    });
}

/// Runs one input; the panic it caused, on any thread, if any.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    hook();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let recorded = PANICKED.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (caught, recorded) {
        (Ok(()), None) => Ok(()),
        (_, Some(message)) => Err(message),
        (Err(_), None) => Err("panic".into()),
    }
}

/// Seeds, then mutations for `budget` (or `max_runs` inputs), from `seed`.
pub fn run(
    target: &'static Target,
    budget: Duration,
    max_runs: Option<u64>,
    seed: u64,
) -> Result<Report, Crash> {
    let started = Instant::now();
    let corpus = corpus(target);
    let fail = |input: Vec<u8>, message: String| {
        let saved = save(target, &input);
        Crash {
            target: target.name,
            message,
            input,
            saved,
        }
    };
    let mut runs = 0;
    for input in &corpus {
        run_one(target, input).map_err(|m| fail(input.clone(), m))?;
        runs += 1;
    }
    let mut rng = Rng::new(seed);
    let empty = vec![Vec::new()];
    let pool = if corpus.is_empty() { &empty } else { &corpus };
    let mut last: Vec<u8> = Vec::new();
    while started.elapsed() < budget && max_runs.is_none_or(|m| runs < m) {
        // Half the time stack on the last mutant (deeper changes), else
        // start again from a seed.
        let base = if !last.is_empty() && rng.below(2) == 0 {
            &last
        } else {
            &pool[rng.below(pool.len())]
        };
        let input = mutate(&mut rng, base, pool, target.dictionary);
        run_one(target, &input).map_err(|m| fail(input.clone(), m))?;
        last = input;
        runs += 1;
    }
    Ok(Report {
        target: target.name,
        runs,
        seeds: corpus.len(),
        elapsed: started.elapsed(),
    })
}

/// Writes a failing input under the system's temporary folder.
fn save(target: &Target, input: &[u8]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    input.hash(&mut h);
    let dir = std::env::temp_dir().join("isdp-fuzz").join(target.name);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("crash-{:016x}", h.finish()));
    std::fs::write(&path, input).ok()?;
    Some(path)
}
