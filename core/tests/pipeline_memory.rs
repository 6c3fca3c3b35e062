//! A pipeline's value limit bounds what a step renders (memory), not only what it
//! sends: measured by the process's peak resident size (`VmHWM`, reset through
//! `/proc/self/clear_refs`; Linux only). The one test of its own binary, so no other
//! test's allocations count.

mod common;

use common::*;
use marathon_core::{ActivityContext, ActivityError, Pipeline, WorkflowStatus};
use serde_json::{Value, json};
/// `VmRSS` or `VmHWM` of this process, in bytes.
fn status(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 1024
}

/// Peak resident bytes (above the resident size at its start) while pipeline `p` runs.
async fn peak_of(p: Pipeline) -> (usize, marathon_core::WorkflowSummary) {
    let mut registry = marathon_core::Registry::new();
    registry
        .activity("echo", |_c: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(v)
        })
        .pipeline("p", p)
        .expect("valid");
    let (store, queue) = backends();
    let engine = builder(&store, &queue).registry(registry).build();
    let w = worker(&engine);
    // Resets the peak resident size to the current one.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = status("VmRSS:");
    let id = start(&engine, "p", json!(null)).await;
    let s = finished(&engine, &id).await;
    let peak = status("VmHWM:").saturating_sub(base);
    w.shutdown().await;
    (peak, s)
}

/// 18 doubling steps reach 524,287 values (under the limit); a last step whose
/// template copies that output 64 times asks for 33.5 M values and fails with
/// `invalid_argument`, and should not first build all of them.
#[tokio::test(start_paused = true)]
async fn a_step_over_the_value_limit_fails_before_it_is_built() {
    let doubling = |last: Option<usize>| {
        let p = (1..19).fold(Pipeline::new().step("s0", "echo", json!(1)), |p, k| {
            let prev = format!("$steps.s{}", k - 1);
            p.step(&format!("s{k}"), "echo", json!([prev, prev]))
        });
        match last {
            Some(copies) => p.step(
                "big",
                "echo",
                Value::Array(vec![json!("$steps.s18"); copies]),
            ),
            None => p,
        }
        .output(json!(1))
    };
    let (base, ok) = peak_of(doubling(None)).await;
    assert_eq!(ok.status, WorkflowStatus::Completed, "{ok:?}");
    let (peak, failed) = peak_of(doubling(Some(64))).await;
    let error = failed.error.expect("failed");
    assert!(
        error.message.contains("more than 1000000 values"),
        "{error:?}"
    );
    let extra = peak.saturating_sub(base);
    assert!(
        extra < 64 << 20,
        "the refused step allocated {} MB more before it was refused",
        extra >> 20
    );
}
