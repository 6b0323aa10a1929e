//! `tidepool bench <suite>`: the single entry point for every benchmark.
//!
//! Each suite fills a [`Report`]: named figures (the keys the issues give) with numbers. With
//! `--json` the report prints as one JSON object; otherwise as a table, with progress lines on
//! stderr while the suite runs.

pub mod alloc;
pub mod api;
pub mod backing;
pub mod boot;
pub mod density;
pub mod hotplug;
pub mod latency;
pub mod loadgen;
pub mod numa_check;
pub mod reclaim;
pub mod trace;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Errors from running a benchmark suite.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The suite name is not one Tidepool knows.
    #[error("unknown benchmark suite `{0}` (known: {known})", known = SUITES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))]
    UnknownSuite(String),
    /// The suite exists in the plan but is not implemented yet.
    #[error("benchmark suite `{0}` is not implemented yet (unsupported)")]
    Unsupported(&'static str),
    /// The suite ran and failed.
    #[error("benchmark suite `{suite}` failed: {reason}")]
    Failed {
        /// Suite name.
        suite: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Options shared by every suite.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// Finish in under 60 s on 2 cores (smaller pool, fewer iterations).
    pub quick: bool,
    /// Print one JSON object instead of a table; progress goes to stderr either way.
    pub json: bool,
    /// `boot` suite: also measure the stock Debian guest booting to `/init` (not with `quick`).
    pub linux: bool,
    /// `backing` suite: as root, temporarily set `shmem_enabled` to `advise` and raise
    /// `vm.nr_hugepages` (both put back after) to measure memfd with THP and hugetlbfs.
    pub allow_host_tuning: bool,
    /// Directory for files a suite writes besides its figures (`density`: JSON and PNG);
    /// None for the suite's default under `target/bench/`.
    pub out: Option<PathBuf>,
    /// `api` suite: start the daemon with `--guest-nice N` instead of its default (to
    /// measure what the guests' lower priority buys).
    pub guest_nice: Option<i32>,
}

/// The figures a suite produced, by name, in insertion order for the table.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<(String, f64, String)>,
}

impl Report {
    /// Record a figure with a unit and short note for the table (the JSON shows the number only).
    pub fn add(&mut self, name: &str, value: f64, note: &str) {
        self.figures.push((name.to_owned(), value, note.to_owned()));
    }

    /// The figure called `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| *v)
    }

    /// One JSON object: figure name to number.
    pub fn to_json(&self) -> String {
        let map: BTreeMap<&str, serde_json::Value> = self
            .figures
            .iter()
            .map(|(n, v, _)| {
                let num = serde_json::Number::from_f64(*v)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null);
                (n.as_str(), num)
            })
            .collect();
        serde_json::to_string_pretty(&map).unwrap_or_else(|_| "{}".to_owned())
    }

    /// A readable table.
    pub fn to_table(&self) -> String {
        let w = self
            .figures
            .iter()
            .map(|(n, _, _)| n.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (n, v, note) in &self.figures {
            out.push_str(&format!("{n:<w$}  {v:>14.3}  {note}\n"));
        }
        out
    }
}

/// Progress output: always to stderr so that `--json` stdout stays one object.
pub fn progress(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "[bench] {msg}");
}

/// The function that runs a suite.
pub type SuiteFn = fn(&BenchOptions) -> Result<Report, BenchError>;

/// A benchmark suite.
#[derive(Debug)]
pub struct Suite {
    /// Name on the command line.
    pub name: &'static str,
    /// One line on what it measures.
    pub about: &'static str,
    run: Option<SuiteFn>,
}

/// Every suite Tidepool has or plans. A suite without a runner answers "unsupported".
pub static SUITES: &[Suite] = &[
    Suite {
        name: "alloc",
        about: "guest-mm allocator: order-0/order-9 pairs, fragmentation after churn, THP success, slab",
        run: Some(alloc::run),
    },
    Suite {
        name: "boot",
        about: "VM create to first instruction, VMM overhead per VM",
        run: Some(boot::run),
    },
    Suite {
        name: "hotplug",
        about: "virtio-mem plug/unplug of 1 GiB, plug/unplug cycles",
        run: Some(hotplug::run),
    },
    Suite {
        name: "backing",
        about: "window backings: first touch, discard and remove for anonymous, memfd, hugetlbfs",
        run: Some(backing::run),
    },
    Suite {
        name: "reclaim",
        about: "free page reporting reclaim against raw madvise discard",
        run: Some(reclaim::run),
    },
    Suite {
        name: "api",
        about: "REST API latency and throughput",
        run: Some(api::run),
    },
    Suite {
        name: "density",
        about: "microVMs held within a resident budget, with and without reclaim",
        run: Some(density::run),
    },
];

/// Run the suite called `name`.
pub fn run(name: &str, opts: &BenchOptions) -> Result<Report, BenchError> {
    let suite = SUITES
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| BenchError::UnknownSuite(name.to_owned()))?;
    let runner = suite.run.ok_or(BenchError::Unsupported(suite.name))?;
    runner(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_is_one_object_of_numbers() {
        let mut r = Report::default();
        r.add("order0_pair_ns", 12.5, "ns");
        r.add("thp_success_rate", 1.0, "");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["order0_pair_ns"], 12.5);
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert!(r.to_table().contains("thp_success_rate"));
    }

    #[test]
    fn unknown_suites_are_errors() {
        let o = BenchOptions::default();
        assert!(matches!(run("nope", &o), Err(BenchError::UnknownSuite(_))));
    }
}
