//! Worker settings at zero: loops pause at least [`MIN_WORKER_INTERVAL`].

mod common;

use async_trait::async_trait;
use common::*;
use marathon_core::testkit::{ForwardingQueue, ForwardingStore};
use marathon_core::{
    Delivery, MIN_WORKER_INTERVAL, Owed, Queue, QueueError, Store, StoreError, Timestamp, Worker,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts receives, depth samples and sweeps.
#[derive(Default)]
struct Calls {
    receives: AtomicU64,
    depths: AtomicU64,
    sweeps: AtomicU64,
}

struct CountingQueue(Arc<dyn Queue>, Arc<Calls>);

#[async_trait]
impl ForwardingQueue for CountingQueue {
    fn inner(&self) -> &dyn Queue {
        &*self.0
    }
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.1.receives.fetch_add(1, Ordering::Relaxed);
        self.0.receive(queue, max, wait, visibility).await
    }
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        self.1.depths.fetch_add(1, Ordering::Relaxed);
        self.0.depth(queue).await
    }
}

struct CountingStore(Arc<dyn Store>, Arc<Calls>);

#[async_trait]
impl ForwardingStore for CountingStore {
    fn inner(&self) -> &dyn Store {
        &*self.0
    }
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        self.1.sweeps.fetch_add(1, Ordering::Relaxed);
        self.0.claim_overdue(now, lease, limit).await
    }
}

/// A worker given zero intervals through the Rust API (the server refuses them in
/// its configuration) pauses its loops at least 1 ms: before, an idle worker's
/// receive loop asked the memory queue again at once on every empty receive (18,687
/// receives in 300 ms on a 2-core machine, a core taken; the sweeper and maintenance
/// round were paced only by the timer's 1 ms resolution).
#[test]
fn zero_intervals_do_not_spin_the_loops() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(Calls::default());
    let counted = rt.block_on(async {
        let (store, queue) = backends();
        let store: Arc<dyn Store> = Arc::new(CountingStore(store, calls.clone()));
        let queue: Arc<dyn Queue> = Arc::new(CountingQueue(queue, calls.clone()));
        let engine = builder(&store, &queue).build();
        let mut cfg = worker_config();
        cfg.poll_wait = Duration::ZERO;
        cfg.visibility = Duration::ZERO;
        cfg.sweep_interval = Duration::ZERO;
        cfg.dead_letter_interval = Duration::ZERO;
        let w = Worker::start(engine, cfg);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let counted = [
            calls.receives.load(Ordering::Relaxed),
            calls.depths.load(Ordering::Relaxed),
            calls.sweeps.load(Ordering::Relaxed),
        ];
        let stopped = tokio::time::timeout(Duration::from_secs(30), w.shutdown()).await;
        assert!(stopped.is_ok(), "shutdown hung");
        counted
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    // At most one call per loop each MIN_WORKER_INTERVAL (300 in 300 ms), with room
    // for a slow machine's timer.
    let most = 2 * (300 / MIN_WORKER_INTERVAL.as_millis() as u64);
    assert!(
        counted.iter().all(|&n| n <= most),
        "(receives, depth samples, sweeps) in 300 ms: {counted:?}"
    );
    assert!(counted.iter().all(|&n| n > 0), "{counted:?}");
}
