//! The declarative builder: sequential steps, parallel groups and steps fed by
//! earlier outputs, compiled into an ordinary workflow function on the same engine.
//!
//! A step's `input` is a JSON template: a string `"$input"` or `"$input.a.b"`
//! is replaced by (part of) the workflow input, `"$steps.NAME"` or
//! `"$steps.NAME.path.0"` by (part of) an earlier step's output; `"$$x"` is the
//! literal string `"$x"`. Everything else is copied as is.
//!
//! ```json
//! {"steps": [
//!   {"type": "activity", "name": "fetch", "activity": "http.get", "input": {"url": "$input.url"}},
//!   {"type": "parallel", "steps": [
//!     {"type": "activity", "name": "summary", "activity": "llm.chat", "input": {"prompt": "$steps.fetch.body"}},
//!     {"type": "activity", "name": "keywords", "activity": "llm.chat", "input": {"prompt": "$steps.fetch.body"}}
//!   ]}
//! ], "output": {"summary": "$steps.summary", "keywords": "$steps.keywords"}}
//! ```

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

use crate::engine::context::WorkflowContext;
use crate::engine::registry::WorkflowFn;
use crate::model::{ActivityOptions, WorkflowError};

/// Why a pipeline definition is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline has no steps.
    #[error("a pipeline needs at least one step")]
    Empty,
    /// Two steps share a name.
    #[error("step name {0:?} is used twice")]
    DuplicateStep(String),
    /// A step name or activity name is empty.
    #[error("step {0:?}: names must not be empty")]
    EmptyName(String),
    /// A parallel group has no steps.
    #[error("a parallel group needs at least one step")]
    EmptyGroup,
    /// A template refers to a step that does not run before it.
    #[error("{at}: {reference:?} refers to a step that has not run before it")]
    UnknownReference {
        /// Where the reference is (a step name or `output`).
        at: String,
        /// The reference.
        reference: String,
    },
    /// A step name contains `.`, which `$steps.NAME.path` could not refer to.
    #[error("step {0:?}: names must not contain '.'")]
    DottedName(String),
    /// A parallel group inside a parallel group.
    #[error("parallel groups cannot be nested")]
    NestedGroup,
    /// A step's options cannot work.
    #[error("step {step:?}: {problem}")]
    BadOptions {
        /// The step.
        step: String,
        /// What is wrong.
        problem: String,
    },
    /// A template string starting with `$` is neither `$input…`, `$steps.…` nor `$$…`.
    #[error(
        "{at}: {reference:?} is not a valid reference ($input, $input.path, $steps.NAME, $steps.NAME.path or $$literal)"
    )]
    BadReference {
        /// Where the reference is.
        at: String,
        /// The reference.
        reference: String,
    },
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Call one activity; its output is kept under `name`.
    Activity {
        /// Step name, unique in the pipeline.
        name: String,
        /// Registered activity name.
        activity: String,
        /// Input template.
        #[serde(default)]
        input: Value,
        /// Retry policy and timeouts.
        #[serde(default)]
        options: ActivityOptions,
    },
    /// Run activity steps in parallel; each sees only the steps before the group.
    Parallel {
        /// The steps of the group.
        steps: Vec<Step>,
    },
}

impl Step {
    /// An activity step with default options.
    pub fn activity(name: impl Into<String>, activity: impl Into<String>, input: Value) -> Self {
        Step::Activity {
            name: name.into(),
            activity: activity.into(),
            input,
            options: ActivityOptions::default(),
        }
    }
}

/// A declarative workflow: steps in order, then an output template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Steps, run in order.
    pub steps: Vec<Step>,
    /// Output template; by default an object of every step's output by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

impl Pipeline {
    /// An empty pipeline.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an activity step with default options.
    #[must_use]
    pub fn step(mut self, name: &str, activity: &str, input: Value) -> Self {
        self.steps.push(Step::activity(name, activity, input));
        self
    }

    /// Appends an activity step with `options`.
    #[must_use]
    pub fn step_with(
        mut self,
        name: &str,
        activity: &str,
        input: Value,
        options: ActivityOptions,
    ) -> Self {
        self.steps.push(Step::Activity {
            name: name.into(),
            activity: activity.into(),
            input,
            options,
        });
        self
    }

    /// Appends a parallel group.
    #[must_use]
    pub fn parallel(mut self, steps: Vec<Step>) -> Self {
        self.steps.push(Step::Parallel { steps });
        self
    }

    /// Sets the output template.
    #[must_use]
    pub fn output(mut self, template: Value) -> Self {
        self.output = Some(template);
        self
    }

    /// Checks names and references.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), PipelineError> {
        if self.steps.is_empty() {
            return Err(PipelineError::Empty);
        }
        let mut done: HashSet<&str> = HashSet::new();
        for step in &self.steps {
            let group: Vec<&Step> = match step {
                Step::Activity { .. } => vec![step],
                Step::Parallel { steps } => {
                    if steps.is_empty() {
                        return Err(PipelineError::EmptyGroup);
                    }
                    steps.iter().collect()
                }
            };
            let mut added: HashSet<&str> = HashSet::new();
            for s in group {
                let Step::Activity {
                    name,
                    activity,
                    input,
                    options,
                } = s
                else {
                    return Err(PipelineError::NestedGroup);
                };
                if name.is_empty() || activity.is_empty() {
                    return Err(PipelineError::EmptyName(name.clone()));
                }
                if name.contains('.') {
                    return Err(PipelineError::DottedName(name.clone()));
                }
                let bad = |problem: &str| {
                    Err(PipelineError::BadOptions {
                        step: name.clone(),
                        problem: problem.to_string(),
                    })
                };
                if let Err(problem) = options.check() {
                    return bad(&format!("options.{problem}"));
                }
                check_refs(input, name, &done)?;
                if done.contains(name.as_str()) || !added.insert(name.as_str()) {
                    return Err(PipelineError::DuplicateStep(name.clone()));
                }
            }
            done.extend(added);
        }
        if let Some(out) = &self.output {
            check_refs(out, "output", &done)?;
        }
        Ok(())
    }

    /// Compiles the pipeline into a workflow function.
    ///
    /// # Errors
    /// When [`Self::validate`] fails.
    pub fn into_workflow(self) -> Result<WorkflowFn, PipelineError> {
        self.validate()?;
        let pipeline = Arc::new(self);
        Ok(Arc::new(move |ctx: WorkflowContext, input: Value| {
            let p = pipeline.clone();
            async move { p.run(&ctx, input).await }.boxed()
        }))
    }

    async fn run(&self, ctx: &WorkflowContext, input: Value) -> Result<Value, WorkflowError> {
        let mut outputs = Map::new();
        for step in &self.steps {
            match step {
                Step::Activity {
                    name,
                    activity,
                    input: template,
                    options,
                } => {
                    let arg = checked(name, render_within(template, &input, &outputs))?;
                    let out: Value = ctx.activity_with(activity, &arg, options.clone()).await?;
                    outputs.insert(name.clone(), out);
                }
                Step::Parallel { steps } => {
                    // Every input is rendered before any step is called: a step that
                    // cannot render fails the run without its siblings being called.
                    let mut names = Vec::new();
                    let mut args = Vec::new();
                    for s in steps {
                        if let Step::Activity {
                            name,
                            activity,
                            input: template,
                            options,
                        } = s
                        {
                            let arg = checked(name, render_within(template, &input, &outputs))?;
                            names.push(name.clone());
                            args.push((activity, arg, options));
                        }
                    }
                    let calls = args.into_iter().map(|(activity, arg, options)| {
                        ctx.activity_with::<_, Value>(activity, &arg, options.clone())
                    });
                    let results = futures::future::try_join_all(calls).await?;
                    for (name, out) in names.into_iter().zip(results) {
                        outputs.insert(name, out);
                    }
                }
            }
        }
        Ok(match &self.output {
            Some(t) => checked("output", render_within(t, &input, &outputs))?,
            None => Value::Object(outputs),
        })
    }
}

/// Most values (arrays, objects and scalars, counted one each) a rendered step
/// input or output may hold: a template can copy an earlier output more than
/// once, and so double the size from step to step.
pub const MAX_RENDERED_VALUES: usize = 1_000_000;

/// `value`, rendered for `at` (a step or `output`), unless it nests deeper than
/// [`crate::MAX_VALUE_DEPTH`] or holds more than [`MAX_RENDERED_VALUES`] values:
/// then the run fails (outputs fed into templates can grow with every step).
fn checked(at: &str, value: Option<Value>) -> Result<Value, WorkflowError> {
    // `None`: rendering ran out of its value budget; else only the depth is left to check.
    let checked = match &value {
        Some(v) => crate::value_within(v, crate::MAX_VALUE_DEPTH, usize::MAX),
        None => Err(crate::ValueLimit::Values),
    };
    let problem = match checked {
        Ok(()) => return Ok(value.unwrap_or_default()),
        Err(crate::ValueLimit::Depth) => {
            format!("nests deeper than {} levels", crate::MAX_VALUE_DEPTH)
        }
        Err(crate::ValueLimit::Values) => format!("holds more than {MAX_RENDERED_VALUES} values"),
    };
    Err(
        WorkflowError::new(format!("{at}: the rendered value {problem}"))
            .with_kind("invalid_argument"),
    )
}

/// A parsed `$` reference.
enum Ref<'a> {
    Input(Vec<&'a str>),
    Step(&'a str, Vec<&'a str>),
    Literal(&'a str),
}

fn parse_ref(s: &str) -> Option<Result<Ref<'_>, ()>> {
    let rest = s.strip_prefix('$')?;
    if let Some(lit) = rest.strip_prefix('$') {
        return Some(Ok(Ref::Literal(lit)));
    }
    // An empty segment (`$input.`, `$steps.a..b`) names nothing: refused, not null.
    if rest.split('.').any(str::is_empty) {
        return Some(Err(()));
    }
    let mut parts = rest.split('.');
    Some(match parts.next() {
        Some("input") => Ok(Ref::Input(parts.collect())),
        Some("steps") => match parts.next() {
            Some(name) => Ok(Ref::Step(name, parts.collect())),
            None => Err(()),
        },
        _ => Err(()),
    })
}

fn check_refs(template: &Value, at: &str, done: &HashSet<&str>) -> Result<(), PipelineError> {
    match template {
        Value::String(s) => match parse_ref(s) {
            None | Some(Ok(Ref::Input(_) | Ref::Literal(_))) => Ok(()),
            Some(Ok(Ref::Step(name, _))) if done.contains(name) => Ok(()),
            Some(Ok(Ref::Step(..))) => Err(PipelineError::UnknownReference {
                at: at.to_string(),
                reference: s.clone(),
            }),
            Some(Err(())) => Err(PipelineError::BadReference {
                at: at.to_string(),
                reference: s.clone(),
            }),
        },
        Value::Array(a) => a.iter().try_for_each(|v| check_refs(v, at, done)),
        Value::Object(o) => o.values().try_for_each(|v| check_refs(v, at, done)),
        _ => Ok(()),
    }
}

/// `template` rendered, or `None` once it would hold more than
/// [`MAX_RENDERED_VALUES`] values: counted while rendering, so that a template
/// copying a large output many times is refused before it is built.
fn render_within(template: &Value, input: &Value, outputs: &Map<String, Value>) -> Option<Value> {
    let mut budget = MAX_RENDERED_VALUES;
    render(template, input, outputs, &mut budget)
}

static NULL: Value = Value::Null;

fn pick<'a>(mut v: &'a Value, path: &[&str]) -> &'a Value {
    for p in path {
        let next = match v {
            Value::Object(o) => o.get(*p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return &NULL,
        }
    }
    v
}

fn render(
    template: &Value,
    input: &Value,
    outputs: &Map<String, Value>,
    budget: &mut usize,
) -> Option<Value> {
    let picked = |v: &Value, budget: &mut usize| {
        *budget -= crate::model::values_within(v, *budget)?;
        Some(v.clone())
    };
    match template {
        Value::String(s) => match parse_ref(s) {
            None | Some(Err(())) => picked(template, budget),
            Some(Ok(Ref::Literal(l))) => picked(&Value::String(format!("${l}")), budget),
            Some(Ok(Ref::Input(path))) => picked(pick(input, &path), budget),
            Some(Ok(Ref::Step(name, path))) => {
                picked(outputs.get(name).map_or(&NULL, |o| pick(o, &path)), budget)
            }
        },
        Value::Array(a) => {
            *budget = budget.checked_sub(1)?;
            a.iter()
                .map(|v| render(v, input, outputs, budget))
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        }
        Value::Object(o) => {
            *budget = budget.checked_sub(1)?;
            o.iter()
                .map(|(k, v)| Some((k.clone(), render(v, input, outputs, budget)?)))
                .collect::<Option<Map<_, _>>>()
                .map(Value::Object)
        }
        other => picked(other, budget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_catches_bad_references() {
        let ok = Pipeline::new()
            .step("a", "x", json!({"v": "$input.v"}))
            .parallel(vec![
                Step::activity("b", "y", json!("$steps.a.z")),
                Step::activity("c", "y", json!(["$steps.a", "$$lit"])),
            ])
            .output(json!({"b": "$steps.b", "c": "$steps.c"}));
        assert_eq!(ok.validate(), Ok(()));
        let sibling = Pipeline::new().parallel(vec![
            Step::activity("b", "y", json!(1)),
            Step::activity("c", "y", json!("$steps.b")),
        ]);
        assert!(matches!(
            sibling.validate(),
            Err(PipelineError::UnknownReference { .. })
        ));
        let dup = Pipeline::new()
            .step("a", "x", json!(1))
            .step("a", "x", json!(1));
        assert_eq!(
            dup.validate(),
            Err(PipelineError::DuplicateStep("a".into()))
        );
        for bad in ["$nope", "$input.", "$steps.", "$steps.a..b", "$input..x"] {
            let p = Pipeline::new()
                .step("a", "x", json!(1))
                .step("b", "x", json!(bad));
            assert!(
                matches!(p.validate(), Err(PipelineError::BadReference { .. })),
                "{bad}"
            );
        }
        assert_eq!(Pipeline::new().validate(), Err(PipelineError::Empty));
    }

    #[test]
    fn templates_render_paths() {
        let mut outputs = Map::new();
        outputs.insert("a".into(), json!({"z": [10, 20]}));
        let t = json!({"x": "$input.k", "y": "$steps.a.z.1", "l": "$$input", "n": 5});
        let v = render_within(&t, &json!({"k": "v"}), &outputs);
        assert_eq!(v, Some(json!({"x": "v", "y": 20, "l": "$input", "n": 5})));
    }

    #[test]
    fn pipelines_parse_from_json() {
        let p: Pipeline = serde_json::from_value(json!({"steps": [
            {"type": "activity", "name": "a", "activity": "echo", "input": "$input"},
            {"type": "parallel", "steps": [{"type": "activity", "name": "b", "activity": "echo"}]}
        ]}))
        .unwrap();
        assert_eq!(p.validate(), Ok(()));
        assert!(serde_json::from_value::<Pipeline>(json!({"steps": [{"type": "nope"}]})).is_err());
    }
}
