//! Run with: cargo run -p example-agent
//!
//! An agent loop as a durable workflow, in memory: a (fake) model proposes tool
//! calls, the tools run as activities, their results go back to the model, until
//! it gives a final answer. The model's first call fails with a 429 and a
//! `Retry-After`, which the engine honours before retrying. Every step streams
//! out of the workflow's event history as it is recorded.

use futures::StreamExt;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EventData, RetryPolicy, Seq,
    StartWorkflow, Worker, WorkerConfig, WorkflowContext, WorkflowError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// One message of the conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// What the model answers: tool calls to make, or a final answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ModelReply {
    ToolCalls { calls: Vec<ToolCall> },
    Final { answer: String },
}

/// A tool the model wants called.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ToolCall {
    tool: String,
    args: Value,
}

/// A stand-in for a chat-completion API: deterministic, and rate-limited on its first call.
async fn fake_model(
    ctx: ActivityContext,
    history: Vec<Message>,
) -> Result<ModelReply, ActivityError> {
    if ctx.attempt() == 1 && history.len() == 1 {
        return Err(ActivityError::retryable("429 Too Many Requests")
            .with_kind("rate_limited")
            .with_retry_after(Duration::from_millis(300)));
    }
    // Stream the "tokens" of the reply as progress events.
    for token in ["thinking", "…"] {
        ctx.progress(&json!({ "token": token })).await?;
    }
    // What a real provider's usage block would say; with `marathon-observability`'s
    // `Metrics` as the engine's observer this is `marathon_llm_tokens_total`.
    let prompt_tokens: usize = history.iter().map(|m| m.content.len() / 4 + 1).sum();
    ctx.record_llm_tokens("fake", "fake-model-1", "input", prompt_tokens as u64);
    ctx.record_llm_tokens("fake", "fake-model-1", "output", 2);
    let tool_results: Vec<&Message> = history.iter().filter(|m| m.role == "tool").collect();
    Ok(if tool_results.is_empty() {
        ModelReply::ToolCalls {
            calls: vec![
                ToolCall {
                    tool: "weather".into(),
                    args: json!({ "city": "Oslo" }),
                },
                ToolCall {
                    tool: "weather".into(),
                    args: json!({ "city": "Lisbon" }),
                },
            ],
        }
    } else {
        let facts: Vec<&str> = tool_results.iter().map(|m| m.content.as_str()).collect();
        ModelReply::Final {
            answer: format!("Pack for both: {}.", facts.join("; ")),
        }
    })
}

/// A tool: looks up the weather (fake, deterministic).
async fn weather(_ctx: ActivityContext, args: Value) -> Result<String, ActivityError> {
    let city = args["city"]
        .as_str()
        .ok_or_else(|| ActivityError::permanent("missing city").with_kind("bad_request"))?;
    let temp = city.len() * 3;
    Ok(format!("{city} is {temp}°C"))
}

/// The agent loop: ordinary async Rust, durable because every step goes through `ctx`.
async fn agent(ctx: WorkflowContext, question: String) -> Result<String, WorkflowError> {
    let model_opts = ActivityOptions::default()
        .start_to_close(Duration::from_secs(60))
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(100),
            ..RetryPolicy::default()
        });
    let mut history = vec![Message {
        role: "user".into(),
        content: question,
    }];
    for _step in 0..5 {
        let reply: ModelReply = ctx
            .activity_with("model", &history, model_opts.clone())
            .await?;
        match reply {
            ModelReply::Final { answer } => return Ok(answer),
            ModelReply::ToolCalls { calls } => {
                // Tools run in parallel, each as its own activity.
                let results = futures::future::join_all(
                    calls
                        .iter()
                        .map(|c| ctx.activity::<_, String>(&c.tool, &c.args)),
                )
                .await;
                for r in results {
                    history.push(Message {
                        role: "tool".into(),
                        content: r?,
                    });
                }
            }
        }
    }
    Err(WorkflowError::new("no answer within 5 steps").with_kind("step_limit"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let engine = Engine::builder()
        .workflow("agent", agent)
        .activity("model", fake_model)
        .activity("weather", weather)
        .build();
    let worker = Worker::start(engine.clone(), WorkerConfig::default());

    let started = engine
        .start(StartWorkflow::with_input(
            "agent",
            &"What should I pack for Oslo and Lisbon?",
        )?)
        .await?;
    let id = started.summary.id;
    println!("started workflow {id}");

    let mut events = engine.subscribe(&id, Seq::ZERO).await?;
    while let Some(event) = events.next().await {
        let event = event?;
        let detail = match &event.data {
            EventData::ActivityScheduled { name, input, .. } => format!("{name}({input})"),
            EventData::ActivityRetrying {
                error, delay_ms, ..
            } => format!("{error}; retrying in {delay_ms} ms"),
            EventData::ActivityCompleted { output, .. } => output.to_string(),
            EventData::Progress { data, .. } => data.to_string(),
            EventData::WorkflowCompleted { output } => output.to_string(),
            EventData::WorkflowFailed { error } => error.to_string(),
            _ => String::new(),
        };
        println!("{:>3} {:<24} {detail}", event.seq, event.data.type_name());
    }
    let summary = engine.get(&id).await?;
    println!("status: {}", summary.status);
    println!("answer: {}", summary.output.unwrap_or_default());
    worker.shutdown().await;
    Ok(())
}
