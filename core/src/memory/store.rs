//! [`MemoryStore`]: the in-memory [`Store`].

use std::collections::hash_map::{Entry, HashMap};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::model::{
    Event, EventData, NewEvent, Seq, SummaryPatch, Timestamp, WorkflowId, WorkflowStatus,
    WorkflowSummary, json_len,
};
use crate::store::{
    AttemptExtend, AttemptStart, Created, EventStream, KeyedAppend, KeyedOutcome, ListBudget,
    ListPage, ListQuery, NewWorkflow, Owed, OwedChanges, OwedEntry, OwedKind, Store, StoreError,
};

/// Number of shards of the workflow map and of the owed-work index.
const SHARDS: usize = 64;
/// Page size of [`Store::list`] when the query asks for 0.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest page size of [`Store::list`].
const MAX_LIST_LIMIT: usize = 1000;
/// Prefix of the list cursors this store issues (a version tag).
const CURSOR_PREFIX: &str = "c1:";
/// Most events a subscription copies out of a history under one lock: a slow
/// reader holds the copies until it takes them (events can be 2 MiB each).
const SUBSCRIBE_BATCH: usize = 8;
/// Rounds of [`Store::claim_overdue`] when candidates change under it.
const CLAIM_ROUNDS: usize = 4;

/// Owed-work deadlines of one shard: `(deadline, workflow, owed key)`.
type OwedIndex = BTreeSet<(Timestamp, WorkflowId, String)>;
/// One workflow's state, locked on its own.
type SharedState = Arc<Mutex<WorkflowState>>;

/// The in-memory [`Store`]: histories, summaries and owed work of one process.
///
/// Per-workflow operations lock only that workflow (and, briefly, its shard's
/// owed-work index); creation, completion, listing and purging also take the
/// global list index for a moment. Lock order: workflow, then index; no lock is
/// held across an `.await`.
pub struct MemoryStore {
    hasher: RandomState,
    shards: Box<[Shard]>,
    index: Mutex<Index>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            index: Mutex::new(Index::default()),
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shard {
    workflows: RwLock<HashMap<WorkflowId, SharedState>>,
    owed: Mutex<OwedIndex>,
}

/// Global indexes: idempotency keys, creation order (for `list`), close order (for `purge_closed`).
#[derive(Default)]
struct Index {
    idempotency: HashMap<String, WorkflowId>,
    by_created: BTreeMap<(Timestamp, WorkflowId), Listed>,
    /// `(closed_at, id)` to `created_at`.
    closed: BTreeMap<(Timestamp, WorkflowId), Timestamp>,
}

/// What `list` filters on, kept current under the workflow's lock.
struct Listed {
    name: String,
    status: WorkflowStatus,
    idempotency_key: Option<String>,
    state: SharedState,
}

struct WorkflowState {
    summary: WorkflowSummary,
    events: Vec<Event>,
    /// Owed entries by key; a workflow owes a handful at most.
    owed: Vec<(String, OwedEntry)>,
    /// Keys of keyed appends already made.
    keys: HashSet<String>,
    /// Wakes subscribers; created by the first subscriber.
    watch: Option<watch::Sender<Seq>>,
    /// Purged: the state is no longer reachable from the store.
    removed: bool,
}

/// A change to an owed-work index, applied in order.
enum IndexOp {
    Remove(Timestamp, String),
    Insert(Timestamp, String),
}

impl WorkflowState {
    fn remove_owed(&mut self, key: &str, ops: &mut Vec<IndexOp>) -> bool {
        match self.owed.iter().position(|(k, _)| k == key) {
            Some(pos) => {
                let (k, e) = self.owed.swap_remove(pos);
                ops.push(IndexOp::Remove(e.deadline, k));
                true
            }
            None => false,
        }
    }

    fn set_owed(&mut self, mut entry: OwedEntry, ops: &mut Vec<IndexOp>) {
        let key = entry.kind.key();
        // An entry replaced by one due at the same deadline falls due a millisecond
        // later, so that a sweeper's `requires_deadline` (its claim's lease end)
        // tells the new entry from the one it claimed.
        if let Some((_, old)) = self.owed.iter().find(|(k, _)| *k == key)
            && old.deadline == entry.deadline
        {
            entry.deadline = entry.deadline.plus(Duration::from_millis(1));
        }
        ops.push(IndexOp::Insert(entry.deadline, key.clone()));
        match self.owed.iter_mut().find(|(k, _)| *k == key) {
            Some((k, old)) => {
                ops.push(IndexOp::Remove(old.deadline, k.clone()));
                // The removal must come before the insertion of the same key.
                let n = ops.len();
                ops.swap(n - 2, n - 1);
                *old = entry;
            }
            None => self.owed.push((key, entry)),
        }
    }
}

impl MemoryStore {
    fn shard(&self, id: &WorkflowId) -> &Shard {
        let i = usize::try_from(self.hasher.hash_one(id) % SHARDS as u64).unwrap_or(0);
        &self.shards[i]
    }

    fn lookup(&self, id: &WorkflowId) -> Option<SharedState> {
        self.shard(id).workflows.read().get(id).cloned()
    }

    /// Replaces owed entry `key` of workflow `id` with what `update` makes of it (given
    /// the entry and the workflow's state), answering what `update` answers; `update`
    /// answers `Err` to write nothing. `None` when the workflow is not here or owes no
    /// such entry. A replacement due at the old deadline falls due a millisecond later,
    /// as any replaced entry does ([`WorkflowState::set_owed`]).
    fn update_attempt<R>(
        &self,
        id: &WorkflowId,
        key: &str,
        update: impl FnOnce(&OwedEntry, &WorkflowState) -> Result<(OwedEntry, R), R>,
    ) -> Option<R> {
        let state = self.lookup(id)?;
        let mut st = state.lock();
        if st.removed {
            return None;
        }
        let (_, entry) = st.owed.iter().find(|(k, _)| k == key)?;
        let (replacement, answer) = match update(entry, &st) {
            Ok(update) => update,
            Err(answer) => return Some(answer),
        };
        let mut ops = Vec::new();
        st.set_owed(replacement, &mut ops);
        self.apply_index(id, ops);
        Some(answer)
    }

    fn lookup_or_not_found(&self, id: &WorkflowId) -> Result<SharedState, StoreError> {
        self.lookup(id)
            .ok_or_else(|| StoreError::NotFound(id.clone()))
    }

    /// Appends `events` and applies owed changes to a locked, running workflow.
    fn commit(
        &self,
        id: &WorkflowId,
        st: &mut WorkflowState,
        events: Vec<NewEvent>,
        requires: Option<&str>,
        owed: OwedChanges,
    ) -> Seq {
        let patch = (!events.is_empty()).then(|| SummaryPatch::of(&events));
        let mut seq = st.summary.last_seq;
        st.events.reserve(events.len());
        for e in events {
            seq = seq.next();
            st.events.push(Event {
                seq,
                timestamp: e.timestamp,
                data: e.data,
            });
        }

        let mut ops = Vec::new();
        if let Some(key) = requires {
            st.remove_owed(key, &mut ops);
        }
        for key in &owed.clear {
            st.remove_owed(key, &mut ops);
        }
        for entry in owed.set {
            st.set_owed(entry, &mut ops);
        }

        if let Some(patch) = patch {
            st.summary.apply(&patch, seq);
            if patch.is_terminal() {
                for (k, e) in st.owed.drain(..) {
                    ops.push(IndexOp::Remove(e.deadline, k));
                }
                let mut index = self.index.lock();
                let created = (st.summary.created_at, id.clone());
                if let Some(listed) = index.by_created.get_mut(&created) {
                    listed.status = st.summary.status;
                }
                let closed_at = st.summary.closed_at.unwrap_or(st.summary.updated_at);
                index
                    .closed
                    .insert((closed_at, id.clone()), st.summary.created_at);
            }
        }

        self.apply_index(id, ops);

        if let Some(w) = &st.watch {
            w.send_replace(seq);
        }
        seq
    }

    /// Applies changes of workflow `id`'s owed entries to its shard's index, in order;
    /// called under the workflow's lock, like every change of its entries.
    fn apply_index(&self, id: &WorkflowId, ops: Vec<IndexOp>) {
        if ops.is_empty() {
            return;
        }
        let mut index = self.shard(id).owed.lock();
        for op in ops {
            match op {
                IndexOp::Remove(d, k) => {
                    index.remove(&(d, id.clone(), k));
                }
                IndexOp::Insert(d, k) => {
                    index.insert((d, id.clone(), k));
                }
            }
        }
    }
}

fn encode_cursor(created_at: Timestamp, id: &WorkflowId) -> String {
    format!("{CURSOR_PREFIX}{}:{id}", created_at.0)
}

fn decode_cursor(cursor: &str) -> Result<(Timestamp, WorkflowId), StoreError> {
    let invalid = || StoreError::InvalidCursor(cursor.to_string());
    let rest = cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(invalid)?;
    let (ts, id) = rest.split_once(':').ok_or_else(invalid)?;
    let ts = ts.parse::<u64>().map_err(|_| invalid())?;
    let id = WorkflowId::parse(id).map_err(|_| invalid())?;
    Ok((Timestamp(ts), id))
}

#[async_trait]
impl Store for MemoryStore {
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        let shard = self.shard(&new.id);
        // Without a key, an existing id is the answer; with one, the key is looked up
        // first (below): it names the start the client made.
        if new.idempotency_key.is_none()
            && let Some(existing) = self.lookup(&new.id)
        {
            let summary = existing.lock().summary.clone();
            return Ok(Created {
                summary,
                created: false,
            });
        }

        let summary = WorkflowSummary {
            id: new.id.clone(),
            name: new.name.clone(),
            status: WorkflowStatus::Running,
            task_queue: new.task_queue.clone(),
            idempotency_key: new.idempotency_key.clone(),
            created_at: new.started_at,
            updated_at: new.started_at,
            closed_at: None,
            last_seq: Seq(1),
            cancel_requested: false,
            output: None,
            error: None,
            task_failure: None,
            trace_context: new.trace_context.clone(),
        };
        let owed = OwedEntry {
            kind: OwedKind::WORKFLOW_TASK,
            task_queue: new.task_queue.clone(),
            deadline: new.task_deadline,
            trace_context: new.trace_context,
            run: None,
        };
        let state: SharedState = Arc::new(Mutex::new(WorkflowState {
            summary: summary.clone(),
            events: vec![Event {
                seq: Seq(1),
                timestamp: new.started_at,
                data: EventData::WorkflowStarted {
                    name: new.name.clone(),
                    input: new.input,
                    task_queue: new.task_queue,
                    idempotency_key: new.idempotency_key.clone(),
                },
            }],
            owed: vec![(OwedKind::WORKFLOW_TASK.key(), owed)],
            keys: HashSet::new(),
            watch: None,
            removed: false,
        }));

        // Held until the owed entry is indexed, so no one sees the workflow half made.
        let _guard = state.lock();
        let existing = {
            let mut index = self.index.lock();
            let by_key = new
                .idempotency_key
                .as_ref()
                .and_then(|k| index.idempotency.get(k).cloned());
            match by_key {
                Some(other) => Some(self.lookup(&other)),
                None => {
                    let mut map = shard.workflows.write();
                    match map.entry(new.id.clone()) {
                        Entry::Occupied(e) => Some(Some(e.get().clone())),
                        Entry::Vacant(v) => {
                            v.insert(state.clone());
                            drop(map);
                            if let Some(k) = &new.idempotency_key {
                                index.idempotency.insert(k.clone(), new.id.clone());
                            }
                            index.by_created.insert(
                                (new.started_at, new.id.clone()),
                                Listed {
                                    name: new.name,
                                    status: WorkflowStatus::Running,
                                    idempotency_key: new.idempotency_key,
                                    state: state.clone(),
                                },
                            );
                            None
                        }
                    }
                }
            }
        };
        match existing {
            Some(Some(other)) => {
                let summary = other.lock().summary.clone();
                Ok(Created {
                    summary,
                    created: false,
                })
            }
            Some(None) => Err(StoreError::Backend(
                "idempotency key names a workflow that is being purged".into(),
            )),
            None => {
                shard.owed.lock().insert((
                    new.task_deadline,
                    new.id,
                    OwedKind::WORKFLOW_TASK.key(),
                ));
                Ok(Created {
                    summary,
                    created: true,
                })
            }
        }
    }

    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        let state = self.lookup_or_not_found(id)?;
        let mut st = state.lock();
        if st.removed {
            return Err(StoreError::NotFound(id.clone()));
        }
        if st.summary.status.is_terminal() {
            return Err(StoreError::Closed(id.clone()));
        }
        if st.summary.last_seq != expected_last {
            return Err(StoreError::Conflict {
                id: id.clone(),
                expected: expected_last,
                actual: st.summary.last_seq,
            });
        }
        Ok(self.commit(id, &mut st, events, None, owed))
    }

    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        let state = self.lookup_or_not_found(id)?;
        let mut st = state.lock();
        if st.removed {
            return Err(StoreError::NotFound(id.clone()));
        }
        // A key recorded before is a repeat even once the workflow has finished (a
        // signal's retry after that signal completed it), so it is checked first.
        if let Some(key) = &append.key
            && st.keys.contains(key)
        {
            return Ok(KeyedOutcome::Duplicate);
        }
        if st.summary.status.is_terminal() {
            return Ok(KeyedOutcome::Closed);
        }
        if let Some(req) = &append.requires
            && !st
                .owed
                .iter()
                .any(|(k, e)| k == req && append.requires_deadline.is_none_or(|d| e.deadline == d))
        {
            return Ok(KeyedOutcome::NotOwed);
        }
        if let Some(key) = append.key {
            st.keys.insert(key);
        }
        let seq = self.commit(
            id,
            &mut st,
            append.events,
            append.requires.as_deref(),
            append.owed,
        );
        Ok(KeyedOutcome::Appended(seq))
    }

    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let state = self.lookup_or_not_found(id)?;
        let st = state.lock();
        if st.removed {
            return Err(StoreError::NotFound(id.clone()));
        }
        let from = usize::try_from(after.0)
            .unwrap_or(usize::MAX)
            .min(st.events.len());
        Ok(st.events[from..].iter().take(limit).cloned().collect())
    }

    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        let state = self.lookup_or_not_found(id)?;
        let rx = {
            let mut st = state.lock();
            if st.removed {
                return Err(StoreError::NotFound(id.clone()));
            }
            let last = st.summary.last_seq;
            st.watch
                .get_or_insert_with(|| watch::channel(last).0)
                .subscribe()
        };
        let sub = Subscription {
            state,
            rx,
            after,
            buf: VecDeque::new(),
            done: false,
            sender_gone: false,
        };
        Ok(Box::pin(futures::stream::unfold(sub, Subscription::next)))
    }

    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        Ok(self.lookup(id).and_then(|s| {
            let st = s.lock();
            (!st.removed).then(|| st.summary.clone())
        }))
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = match query.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        let start = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let mut picked = Vec::with_capacity(limit.min(64));
        let mut more = false;
        {
            let index = self.index.lock();
            let range = match &start {
                Some(c) => index.by_created.range(..c.clone()),
                None => index.by_created.range(..),
            };
            for ((created_at, id), listed) in range.rev() {
                if query.status.is_some_and(|s| s != listed.status)
                    || query.name.as_ref().is_some_and(|n| *n != listed.name)
                {
                    continue;
                }
                if picked.len() == limit {
                    more = true;
                    break;
                }
                picked.push((listed.state.clone(), *created_at, id.clone()));
            }
        }
        // Summaries are measured before they are copied: the page stops at about
        // LIST_PAGE_BYTES of JSON, whatever `limit` allows.
        let mut items = Vec::with_capacity(picked.len());
        let mut budget = ListBudget::default();
        let mut last = None;
        for (state, created_at, id) in picked {
            let st = state.lock();
            // Purged or finished since the index was read (the copies come after it):
            // skipped, as the Redis store does, but paging goes on after it.
            if st.removed || query.status.is_some_and(|s| s != st.summary.status) {
                last = Some((created_at, id));
                continue;
            }
            if !budget.admit(json_len(&st.summary)) {
                more = true;
                break;
            }
            items.push(st.summary.clone());
            last = Some((created_at, id));
        }
        let next_cursor = match (more, last) {
            (true, Some((ts, id))) => Some(encode_cursor(ts, &id)),
            _ => None,
        };
        Ok(ListPage { items, next_cursor })
    }

    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError> {
        let started = self.update_attempt(id, key, |entry, _| {
            let mut marked = entry.clone();
            let OwedKind::Activity {
                started,
                started_copy,
                ..
            } = &mut marked.kind
            else {
                return Err(AttemptStart::NotOwed);
            };
            if let Some(since) = *started
                && entry.deadline > now
                && !(redelivered && *started_copy == copy)
            {
                return Err(AttemptStart::Running { since });
            }
            *started = Some(now);
            *started_copy = copy;
            marked.deadline = deadline;
            Ok((marked, AttemptStart::Started))
        });
        Ok(started.unwrap_or(AttemptStart::NotOwed))
    }

    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        let extended = self.update_attempt(id, key, |entry, st| {
            let OwedKind::Activity {
                started: marked,
                started_copy,
                ..
            } = &entry.kind
            else {
                return Err(AttemptExtend::NotOwed);
            };
            if *marked != Some(started) || *started_copy != copy {
                return Err(AttemptExtend::NotOwed);
            }
            let mut extended = entry.clone();
            extended.deadline = deadline;
            let cancel_requested = st.summary.cancel_requested;
            Ok((extended, AttemptExtend::Extended { cancel_requested }))
        });
        Ok(extended.unwrap_or(AttemptExtend::NotOwed))
    }

    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        let until = now.plus(lease);
        let mut claimed = Vec::new();
        for _ in 0..CLAIM_ROUNDS {
            let want = limit - claimed.len();
            if want == 0 {
                break;
            }
            let mut candidates: Vec<(Timestamp, WorkflowId, String)> = Vec::new();
            for shard in &*self.shards {
                let index = shard.owed.lock();
                candidates.extend(
                    index
                        .iter()
                        .take_while(|(d, _, _)| *d <= now)
                        .take(want)
                        .cloned(),
                );
            }
            if candidates.is_empty() {
                break;
            }
            candidates.sort_unstable();
            let mut missed = false;
            for (deadline, id, key) in candidates {
                if claimed.len() == limit {
                    break;
                }
                let Some(state) = self.lookup(&id) else {
                    missed = true;
                    continue;
                };
                let mut st = state.lock();
                let Some((_, entry)) = st
                    .owed
                    .iter_mut()
                    .find(|(k, e)| *k == key && e.deadline == deadline)
                else {
                    // Changed since the scan; the index changed with it.
                    missed = true;
                    continue;
                };
                let before = entry.clone();
                entry.deadline = until;
                {
                    let mut index = self.shard(&id).owed.lock();
                    index.remove(&(deadline, id.clone(), key.clone()));
                    index.insert((until, id.clone(), key));
                }
                drop(st);
                claimed.push(Owed {
                    workflow_id: id,
                    entry: before,
                });
            }
            if !missed {
                break;
            }
        }
        Ok(claimed)
    }

    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut victims = Vec::new();
        {
            let mut index = self.index.lock();
            let keys: Vec<_> = index
                .closed
                .iter()
                .take_while(|((closed_at, _), _)| *closed_at < closed_before)
                .take(limit)
                .map(|(k, created)| (k.clone(), *created))
                .collect();
            for ((closed_at, id), created_at) in keys {
                index.closed.remove(&(closed_at, id.clone()));
                if let Some(listed) = index.by_created.remove(&(created_at, id.clone())) {
                    if let Some(k) = &listed.idempotency_key
                        && index.idempotency.get(k) == Some(&id)
                    {
                        index.idempotency.remove(k);
                    }
                    victims.push((id, listed.state));
                }
            }
        }
        let count = victims.len();
        for (id, state) in victims {
            let shard = self.shard(&id);
            {
                let mut map = shard.workflows.write();
                if map.get(&id).is_some_and(|s| Arc::ptr_eq(s, &state)) {
                    map.remove(&id);
                }
            }
            let mut st = state.lock();
            st.removed = true;
            st.watch = None;
            st.keys = HashSet::new();
            st.events = Vec::new();
            if !st.owed.is_empty() {
                let mut index = shard.owed.lock();
                for (k, e) in st.owed.drain(..) {
                    index.remove(&(e.deadline, id.clone(), k));
                }
            }
        }
        Ok(count)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The state of one [`Store::subscribe`] stream.
struct Subscription {
    state: SharedState,
    rx: watch::Receiver<Seq>,
    after: Seq,
    buf: VecDeque<Event>,
    done: bool,
    sender_gone: bool,
}

impl Subscription {
    async fn next(mut self) -> Option<(Result<Event, StoreError>, Self)> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                if e.data.is_terminal() {
                    self.done = true;
                    self.buf.clear();
                }
                self.after = e.seq;
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            // Mark the current version seen before reading, so an append after
            // the read wakes `changed` below.
            self.rx.borrow_and_update();
            let finished = {
                let st = self.state.lock();
                if st.removed {
                    return None;
                }
                let from = usize::try_from(self.after.0)
                    .unwrap_or(usize::MAX)
                    .min(st.events.len());
                self.buf
                    .extend(st.events[from..].iter().take(SUBSCRIBE_BATCH).cloned());
                st.summary.status.is_terminal()
            };
            if !self.buf.is_empty() {
                continue;
            }
            if finished || self.sender_gone {
                return None;
            }
            if self.rx.changed().await.is_err() {
                self.sender_gone = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    fn new_wf(id: &WorkflowId, key: Option<&str>) -> NewWorkflow {
        NewWorkflow {
            id: id.clone(),
            name: "unit".into(),
            input: json!(null),
            task_queue: "tq".into(),
            idempotency_key: key.map(Into::into),
            started_at: Timestamp(10),
            task_deadline: Timestamp(20),
            trace_context: None,
        }
    }

    #[test]
    fn cursors_round_trip() {
        let id = WorkflowId::parse("a:b.c").unwrap();
        let c = encode_cursor(Timestamp(42), &id);
        assert_eq!(decode_cursor(&c).unwrap(), (Timestamp(42), id));
        for bad in ["", "c1:", "c1:x:y", "c1:12", "c2:1:a", "c1:1:a b"] {
            assert!(matches!(
                decode_cursor(bad),
                Err(StoreError::InvalidCursor(_))
            ));
        }
    }

    #[tokio::test]
    async fn list_limit_defaults_and_caps() {
        let store = MemoryStore::default();
        for _ in 0..1005 {
            store
                .create(new_wf(&WorkflowId::random(), None))
                .await
                .unwrap();
        }
        let page = store.list(&ListQuery::default()).await.unwrap();
        assert_eq!(page.items.len(), DEFAULT_LIST_LIMIT);
        let page = store
            .list(&ListQuery {
                limit: 5000,
                ..ListQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(page.items.len(), MAX_LIST_LIMIT);
        assert!(page.next_cursor.is_some());
    }

    #[tokio::test]
    async fn replacing_an_owed_key_in_one_batch_keeps_the_index_exact() {
        let store = MemoryStore::default();
        let id = WorkflowId::random();
        store.create(new_wf(&id, None)).await.unwrap();
        let entry = |d| OwedEntry {
            kind: OwedKind::Timer { timer_id: 1 },
            task_queue: "tq".into(),
            deadline: Timestamp(d),
            trace_context: None,
            run: None,
        };
        store
            .append(
                &id,
                Seq(1),
                vec![],
                OwedChanges::none()
                    .clear("wf")
                    .set(entry(30))
                    .set(entry(40)),
            )
            .await
            .unwrap();
        let claimed = store
            .claim_overdue(Timestamp(100), Duration::from_secs(1), 10)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].entry, entry(40));
        let shard = store.shard(&id);
        assert_eq!(shard.owed.lock().len(), 1);
    }

    #[tokio::test]
    async fn a_subscription_copies_a_few_events_at_a_time() {
        let store = MemoryStore::default();
        let id = WorkflowId::random();
        store.create(new_wf(&id, None)).await.unwrap();
        let signals = (0..40)
            .map(|i| {
                NewEvent::new(
                    Timestamp(11),
                    EventData::SignalReceived {
                        name: "s".into(),
                        payload: json!(i),
                    },
                )
            })
            .collect();
        store
            .append(&id, Seq(1), signals, OwedChanges::none())
            .await
            .unwrap();
        let state = store.lookup_or_not_found(&id).unwrap();
        let rx = state
            .lock()
            .watch
            .get_or_insert_with(|| watch::channel(Seq(41)).0)
            .subscribe();
        let mut sub = Subscription {
            state,
            rx,
            after: Seq(0),
            buf: VecDeque::new(),
            done: false,
            sender_gone: false,
        };
        let mut seen = Vec::new();
        while seen.len() < 41 {
            let (event, next) = sub.next().await.unwrap();
            seen.push(event.unwrap().seq.0);
            // What it holds beside the event it hands out: before, the whole
            // history (up to 256 events) was copied at once.
            assert!(next.buf.len() < 8, "{} held", next.buf.len());
            sub = next;
        }
        assert_eq!(seen, (1..=41).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn purge_ends_subscribers_and_frees_the_idempotency_key() {
        let store = MemoryStore::default();
        let id = WorkflowId::random();
        store.create(new_wf(&id, Some("k"))).await.unwrap();
        let mut sub = store.subscribe(&id, Seq(1)).await.unwrap();
        store
            .append(
                &id,
                Seq(1),
                vec![NewEvent::new(
                    Timestamp(11),
                    EventData::WorkflowCompleted { output: json!(1) },
                )],
                OwedChanges::none(),
            )
            .await
            .unwrap();
        assert_eq!(store.purge_closed(Timestamp(12), 10).await.unwrap(), 1);
        // The terminal event was appended before the purge; the stream still ends.
        let rest: Vec<_> = sub.by_ref().collect().await;
        assert!(rest.len() <= 1);
        let again = store
            .create(new_wf(&WorkflowId::random(), Some("k")))
            .await
            .unwrap();
        assert!(again.created);
        assert!(store.get(&id).await.unwrap().is_none());
        assert!(
            store
                .shards
                .iter()
                .all(|s| s.owed.lock().iter().all(|(_, w, _)| *w != id))
        );
    }
}
