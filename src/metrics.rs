//! Counters and histograms kept with atomics, and their rendering in the
//! Prometheus text format (version 0.0.4). Pure: the parts of the server
//! that measure something own their figures; `api::metrics` gathers and
//! renders them.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];
/// Upper bounds of the batch size buckets, in operations.
pub const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0, 4096.0];

/// A histogram over fixed buckets; observations are lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative), then above
    /// the last bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = (value.max(0.0) * 1e6) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` with
    /// `labels` (already rendered, e.g. `method="GET"`, or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let comma = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{comma}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{comma}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// The figures of the HTTP requests: a latency histogram per endpoint
/// (the route's template, never the concrete path), method and status.
#[derive(Default)]
pub struct RequestMetrics {
    by_route: RwLock<HashMap<RequestKey, Arc<Histogram>>>,
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RequestKey {
    endpoint: String,
    method: String,
    status: u16,
}

impl RequestMetrics {
    pub fn observe(&self, endpoint: &str, method: &str, status: u16, seconds: f64) {
        let key = RequestKey {
            endpoint: endpoint.to_owned(),
            method: method.to_owned(),
            status,
        };
        let known = self
            .by_route
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let histogram = match known {
            Some(histogram) => histogram,
            None => self
                .by_route
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_insert_with(|| Arc::new(Histogram::new(&LATENCY_BUCKETS)))
                .clone(),
        };
        histogram.observe(seconds);
    }

    /// The request counter and latency histogram families.
    pub fn render(&self, out: &mut String) {
        let routes = self.by_route.read().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<&RequestKey> = routes.keys().collect();
        keys.sort();
        family(
            out,
            "myelin_http_requests_total",
            "counter",
            "HTTP requests answered, by endpoint, method and status.",
        );
        for key in &keys {
            let count = routes[*key]
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>();
            let _ = writeln!(
                out,
                "myelin_http_requests_total{{{}}} {count}",
                key.labels()
            );
        }
        family(
            out,
            "myelin_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its answer, by endpoint, method and status.",
        );
        for key in &keys {
            routes[*key].render(out, "myelin_http_request_duration_seconds", &key.labels());
        }
    }
}

impl RequestKey {
    fn labels(&self) -> String {
        format!(
            "endpoint=\"{}\",method=\"{}\",status=\"{}\"",
            escape(&self.endpoint),
            escape(&self.method),
            self.status
        )
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family of one sample without labels.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let histogram = Histogram::new(&SIZE_BUCKETS);
        for value in [1.0, 3.0, 3.0, 5000.0] {
            histogram.observe(value);
        }
        let mut out = String::new();
        histogram.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4096\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 5007\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
