//! [`ShardedHistogramVec`]: a Prometheus histogram vector whose every series is
//! striped across threads, so that threads observing the same series do not contend.
//!
//! A `prometheus::Histogram` keeps its counts in atomics that every observation
//! updates, four of them on one shared cache line. A worker observes about fifty
//! latencies per W3 workflow, mostly into the same few series, so with two or more
//! worker threads those lines move between cores on nearly every call: under `perf`,
//! `Histogram::observe` took 4.4 % of the time of the in-memory W3 with metrics, six
//! times its share of instructions, and the contention grows with the core count.
//!
//! Here each thread observes into the child of one of [`SHARDS`] histogram vectors,
//! resolved on its first use there; scraping sums the shards' children series by
//! series, so the exposition is exactly that of one `HistogramVec` fed the same
//! observations.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Metric, MetricFamily};
use prometheus::{Histogram, HistogramOpts, HistogramVec};

/// How many stripes a series has: threads beyond this many share them round-robin.
pub(crate) const SHARDS: usize = 8;

/// The stripe this thread observes into, assigned round-robin on its first observation.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A histogram vector striped across threads (see the module docs); register it as a
/// [`Collector`] and observe through [`ShardedHistogramVec::with_label_values`].
#[derive(Clone, Debug)]
pub(crate) struct ShardedHistogramVec {
    shards: Arc<[HistogramVec]>,
}

impl ShardedHistogramVec {
    /// A vector of histograms named and bucketed by `opts`, with these label names.
    pub(crate) fn new(
        opts: &HistogramOpts,
        labels: &[&str],
    ) -> Result<ShardedHistogramVec, prometheus::Error> {
        let shards = (0..SHARDS)
            .map(|_| HistogramVec::new(opts.clone(), labels))
            .collect::<Result<_, _>>()?;
        Ok(ShardedHistogramVec { shards })
    }

    /// The series of these label values, its stripes resolved as threads first use them.
    pub(crate) fn with_label_values(&self, values: &[&str]) -> ShardedHistogram {
        ShardedHistogram {
            vec: self.clone(),
            labels: values.iter().map(|v| (*v).to_owned()).collect(),
            stripes: Default::default(),
        }
    }
}

/// One series of a [`ShardedHistogramVec`].
#[derive(Debug)]
pub(crate) struct ShardedHistogram {
    vec: ShardedHistogramVec,
    labels: Box<[String]>,
    stripes: [OnceLock<Histogram>; SHARDS],
}

impl ShardedHistogram {
    /// Adds one observation, into this thread's stripe.
    pub(crate) fn observe(&self, v: f64) {
        let i = shard();
        self.stripes[i]
            .get_or_init(|| {
                let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
                self.vec.shards[i].with_label_values(&labels)
            })
            .observe(v);
    }
}

impl Collector for ShardedHistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        self.shards.first().map(|s| s.desc()).unwrap_or_default()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.shards.iter().flat_map(|s| s.collect());
        let Some(mut family) = families.next() else {
            return Vec::new();
        };
        // Series by their label pairs; the registry sorts them again when gathering.
        let mut series: BTreeMap<Vec<(String, String)>, Metric> = BTreeMap::new();
        for metric in std::iter::once(family.take_metric())
            .chain(families.map(|mut f| f.take_metric()))
            .flatten()
        {
            let key = metric
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            match series.get_mut(&key) {
                Some(sum) => add(sum, &metric),
                None => {
                    series.insert(key, metric);
                }
            }
        }
        family.set_metric(series.into_values().collect());
        vec![family]
    }
}

/// Adds histogram `m`'s counts to `sum`'s (same series, same buckets).
fn add(sum: &mut Metric, m: &Metric) {
    let (a, b) = (sum.get_histogram(), m.get_histogram());
    let mut h = a.clone();
    h.set_sample_count(a.get_sample_count() + b.get_sample_count());
    h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
    let buckets = a
        .get_bucket()
        .iter()
        .zip(b.get_bucket())
        .map(|(x, y)| {
            let mut bucket = x.clone();
            bucket.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
            bucket
        })
        .collect();
    h.set_bucket(buckets);
    sum.set_histogram(h);
}

#[cfg(test)]
mod tests {
    use prometheus::core::Collector as _;
    use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};

    use super::{SHARDS, ShardedHistogramVec};

    fn render(r: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .expect("encodes");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn exposes_what_one_histogram_vec_fed_the_same_observations_exposes() {
        let opts = HistogramOpts::new("t_seconds", "Test.").buckets(vec![0.1, 1.0, 10.0]);
        let (plain_registry, sharded_registry) = (Registry::new(), Registry::new());
        let plain = HistogramVec::new(opts.clone(), &["op", "outcome"]).expect("valid");
        plain_registry
            .register(Box::new(plain.clone()))
            .expect("registers");
        let sharded = ShardedHistogramVec::new(&opts, &["op", "outcome"]).expect("valid");
        sharded_registry
            .register(Box::new(sharded.clone()))
            .expect("registers");
        // Nothing observed: neither shows the family.
        assert_eq!(render(&sharded_registry), render(&plain_registry));
        let append = sharded.with_label_values(&["append", "ok"]);
        let read = sharded.with_label_values(&["read", "ok"]);
        // More threads than stripes, so that stripes are shared as well as separate;
        // one series is observed on every thread, the other on some.
        let threads = SHARDS + 3;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (plain, append, read) = (&plain, &append, &read);
                s.spawn(move || {
                    for i in 0..100 {
                        // Multiples of 1/64: every sum is exact, in any order.
                        let v = f64::from(u32::try_from(t * 100 + i).expect("small")) / 64.0;
                        append.observe(v);
                        plain.with_label_values(&["append", "ok"]).observe(v);
                        if t % 3 == 0 {
                            read.observe(v / 8.0);
                            plain.with_label_values(&["read", "ok"]).observe(v / 8.0);
                        }
                    }
                });
            }
        });
        let text = render(&sharded_registry);
        assert_eq!(text, render(&plain_registry));
        assert!(
            text.contains(&format!(
                "t_seconds_count{{op=\"append\",outcome=\"ok\"}} {}",
                threads * 100
            )),
            "{text}"
        );
        // The threads did spread over the stripes.
        let used = sharded
            .shards
            .iter()
            .filter(|s| s.collect().iter().any(|f| !f.get_metric().is_empty()))
            .count();
        assert_eq!(used, SHARDS);
        // A second registration of the same name is refused, as for a plain vector.
        let again = ShardedHistogramVec::new(&opts, &["op", "outcome"]).expect("valid");
        assert!(sharded_registry.register(Box::new(again)).is_err());
    }
}
