//! The conformance suites every `Store` and `Queue` backend runs unchanged.
//!
//! Each case is a plain `async fn` taking a fresh, empty backend as
//! `Arc<dyn Store>` (or `Arc<dyn Queue>`); [`store_conformance!`](crate::store_conformance)
//! and [`queue_conformance!`](crate::queue_conformance) stamp one
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per case. The
//! crate that invokes them needs `tokio` (features `macros`, `rt-multi-thread`)
//! among its dev-dependencies.
//!
//! ```ignore
//! async fn fresh() -> RedisStore { /* a new, empty namespace */ }
//! async fn teardown(store: &RedisStore) { /* remove the namespace */ }
//! marathon_core::store_conformance!(fresh(), teardown);
//! ```
//!
//! The teardown runs after each case, whether it passed or panicked. Prefer an
//! `async fn(&Backend)` (a closure returning a future that borrows its argument
//! does not type-check).

pub mod forward;
pub mod queue;
pub mod store;

pub use forward::{ForwardingQueue, ForwardingStore};

/// What the macros need, re-exported so invoking crates do not depend on it.
#[doc(hidden)]
pub mod __private {
    pub use futures::FutureExt;
}

/// A teardown that does nothing, used when none is given.
#[doc(hidden)]
pub async fn no_teardown<B>(_backend: &B) {}

/// Stamps one test per case of a suite (used by the public macros).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($suite:ident, $backend:path, $fresh:expr, $teardown:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = ::std::sync::Arc::new($fresh.await);
                let shared: ::std::sync::Arc<dyn $backend> = backend.clone();
                let outcome = $crate::testkit::__private::FutureExt::catch_unwind(
                    ::std::panic::AssertUnwindSafe($crate::testkit::$suite::$case(shared)),
                )
                .await;
                ($teardown)(&*backend).await;
                if let Err(panic) = outcome {
                    ::std::panic::resume_unwind(panic);
                }
            }
        )*
    };
}

/// Runs the `Store` conformance suite: `store_conformance!(fresh())` or
/// `store_conformance!(fresh(), teardown)`.
///
/// `fresh()` is re-evaluated in every test and must yield a future of a new,
/// empty backend; `teardown` is called with `&Backend` and returns a future.
#[macro_export]
macro_rules! store_conformance {
    ($fresh:expr $(,)?) => {
        $crate::store_conformance!($fresh, $crate::testkit::no_teardown);
    };
    ($fresh:expr, $teardown:expr $(,)?) => {
        /// The `Store` conformance suite.
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;
            $crate::__conformance_tests!(
                store, $crate::Store, $fresh, $teardown;
                create_is_idempotent_on_id,
                create_is_idempotent_on_idempotency_key,
                create_checks_the_idempotency_key_before_the_id,
                create_records_started_event_summary_and_owed_task,
                create_keeps_the_runs_trace_context,
                stale_append_writes_nothing,
                one_of_concurrent_appenders_wins,
                events_read_in_order_and_paged,
                unknown_workflow_is_not_found,
                terminal_event_closes_and_clears_owed_work,
                keyed_append_at_most_once_per_key,
                keyed_append_requires_and_consumes_owed_entry,
                keyed_append_closed_after_terminal,
                empty_keyed_append_swaps_owed_work,
                start_attempt_marks_and_dedupes,
                extend_attempt_moves_only_its_own_mark,
                an_entry_replaced_since_the_claim_is_not_owed_at_the_claimed_deadline,
                summary_follows_events,
                claim_overdue_leases_entries,
                owed_entries_follow_appends,
                due_timer_goes_to_one_claimant,
                list_filters_by_status_and_name,
                list_pages_cover_everything_once,
                list_paging_is_stable_while_status_changes,
                list_pages_stop_at_their_byte_budget,
                list_rejects_invalid_cursor,
                subscribe_sees_live_events_and_ends,
                subscribe_to_finished_workflow_replays_tail,
                purge_removes_only_old_closed_workflows,
                empty_append_changes_owed_work_only,
            );
        }
    };
}

/// Runs the `Queue` conformance suite: `queue_conformance!(fresh())` or
/// `queue_conformance!(fresh(), teardown)`.
///
/// The backend must dead-letter a message after
/// [`queue::MAX_RECEIVES`](crate::testkit::queue::MAX_RECEIVES) receives.
#[macro_export]
macro_rules! queue_conformance {
    ($fresh:expr $(,)?) => {
        $crate::queue_conformance!($fresh, $crate::testkit::no_teardown);
    };
    ($fresh:expr, $teardown:expr $(,)?) => {
        /// The `Queue` conformance suite.
        mod queue_conformance {
            #[allow(unused_imports)]
            use super::*;
            $crate::__conformance_tests!(
                queue, $crate::Queue, $fresh, $teardown;
                enqueue_receive_ack,
                receive_on_empty_queue_waits,
                batch_is_received_exactly_once,
                delayed_message_is_invisible_until_due,
                unacked_message_is_redelivered,
                extend_keeps_message_invisible,
                a_waiting_receive_gets_a_message_whose_visibility_ran_out,
                nack_redelivers_after_delay,
                acked_receipt_is_spent,
                dead_letters_after_max_receives,
                depth_counts_waiting_messages,
                trace_context_round_trips,
                named_queues_are_isolated,
            );
        }
    };
}
