//! Built-in demo workflows and activities, so that a fresh `marathon serve` runs something.
//!
//! Activities: `echo` (returns its input), `upper` (upper-cases every string in
//! its input), `sleep` (sleeps its input in ms, heartbeating). Workflows: `echo`
//! (calls activity `echo`), `sleep-then-echo` (a durable timer, then `echo`) and
//! `pipeline` (runs a declarative [`Pipeline`] given in its input).

use marathon_core::engine::pipeline::Step;
use marathon_core::{
    ActivityContext, ActivityError, Pipeline, Registry, WorkflowContext, WorkflowError,
};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// Input of the `sleep-then-echo` workflow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepThenEcho {
    /// How long to sleep (durable timer), in ms. Default 1000.
    #[serde(default = "default_sleep_ms")]
    ms: u64,
    /// What to echo afterwards.
    #[serde(default)]
    value: Value,
}

fn default_sleep_ms() -> u64 {
    1000
}

impl Default for SleepThenEcho {
    /// The input of a start without one (`null`): 1000 ms, then `null`.
    fn default() -> Self {
        Self {
            ms: default_sleep_ms(),
            value: Value::Null,
        }
    }
}

/// Input of the `pipeline` workflow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineInput {
    /// The pipeline definition.
    pipeline: Pipeline,
    /// The pipeline's input (`$input` in templates).
    #[serde(default)]
    input: Value,
}

/// Input of the `sleep` activity: a number of ms, or `{"ms": n}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SleepInput {
    Ms(u64),
    Object { ms: u64 },
}

/// Registers the built-in workflows and activities on `registry`.
pub fn register(registry: &mut Registry) {
    registry
        .activity("echo", |_ctx: ActivityContext, input: Value| async move {
            Ok::<_, ActivityError>(input)
        })
        .activity("upper", |_ctx: ActivityContext, input: Value| async move {
            Ok::<_, ActivityError>(upper(input))
        })
        .activity(
            "sleep",
            |ctx: ActivityContext, input: SleepInput| async move {
                let ms = match input {
                    SleepInput::Ms(ms) | SleepInput::Object { ms } => ms,
                };
                let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
                while tokio::time::Instant::now() < deadline {
                    ctx.heartbeat().await?;
                    let step = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
                    tokio::select! {
                        () = tokio::time::sleep_until(step) => {}
                        () = ctx.cancelled() => return Err(ActivityError::canceled()),
                    }
                }
                Ok(serde_json::json!({ "slept_ms": ms }))
            },
        )
        .workflow("echo", |ctx: WorkflowContext, input: Value| async move {
            ctx.activity::<_, Value>("echo", &input).await
        })
        .workflow(
            "sleep-then-echo",
            // `null` (a start without an input) takes every default, as `{}` does.
            |ctx: WorkflowContext, input: Option<SleepThenEcho>| async move {
                let input = input.unwrap_or_default();
                ctx.sleep(Duration::from_millis(input.ms)).await?;
                ctx.activity::<_, Value>("echo", &input.value).await
            },
        )
        .workflow(
            "pipeline",
            |ctx: WorkflowContext, input: PipelineInput| async move {
                let run = input
                    .pipeline
                    .into_workflow()
                    .map_err(|e| WorkflowError::new(e.to_string()).with_kind("invalid_argument"))?;
                run(ctx, input.input).await
            },
        );
}

/// Checks a `pipeline` workflow's input at start: it parses, validates and
/// names only registered activities.
///
/// # Errors
/// A client-facing message naming the problem.
pub fn validate_pipeline_input(input: &Value, registry: &Registry) -> Result<(), String> {
    let parsed: PipelineInput =
        serde_json::from_value(input.clone()).map_err(|e| format!("pipeline input: {e}"))?;
    parsed
        .pipeline
        .validate()
        .map_err(|e| format!("pipeline: {e}"))?;
    let mut names = Vec::new();
    for step in &parsed.pipeline.steps {
        match step {
            Step::Activity { activity, .. } => names.push(activity),
            Step::Parallel { steps } => {
                for s in steps {
                    if let Step::Activity { activity, .. } = s {
                        names.push(activity);
                    }
                }
            }
        }
    }
    for name in names {
        if registry.find_activity(name).is_none() {
            return Err(format!("pipeline: activity {name:?} is not registered"));
        }
    }
    Ok(())
}

fn upper(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.to_uppercase()),
        Value::Array(a) => Value::Array(a.into_iter().map(upper).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, upper(v))).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pipeline_input_is_checked() {
        let mut r = Registry::new();
        register(&mut r);
        let ok = json!({"pipeline": {"steps": [{"type": "activity", "name": "a", "activity": "upper", "input": "$input"}]}, "input": "x"});
        assert_eq!(validate_pipeline_input(&ok, &r), Ok(()));
        let unknown =
            json!({"pipeline": {"steps": [{"type": "activity", "name": "a", "activity": "nope"}]}});
        assert!(validate_pipeline_input(&unknown, &r).is_err());
        assert!(validate_pipeline_input(&json!({"pipeline": {"steps": []}}), &r).is_err());
        assert!(validate_pipeline_input(&json!(3), &r).is_err());
        // sleep-then-echo is typed: the registry checks its input at start.
        assert_eq!(
            r.check_input("sleep-then-echo", &json!({"ms": 5, "value": [1]})),
            Ok(())
        );
        assert_eq!(r.check_input("sleep-then-echo", &json!({})), Ok(()));
        assert_eq!(r.check_input("sleep-then-echo", &json!(null)), Ok(()));
        for bad in [json!({"ms": "x"}), json!({"mss": 5}), json!(3)] {
            assert!(r.check_input("sleep-then-echo", &bad).is_err(), "{bad}");
        }
        assert_eq!(upper(json!({"a": ["b", 1]})), json!({"a": ["B", 1]}));
    }
}
