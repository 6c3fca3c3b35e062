//! Key layout: every key of a workflow and its shard's indexes, timers and
//! stream share the shard's hash tag, so each script touches one cluster slot.
//!
//! ```text
//! {P}{sN}:wf:<id>:sum        hash   summary fields
//! {P}{sN}:wf:<id>:ev         list   event JSON, seq n at index n-1
//! {P}{sN}:wf:<id>:owed       hash   owed key -> OwedEntry JSON
//! {P}{sN}:wf:<id>:dk         set    keyed-append dedupe keys
//! {P}{sN}:owed               zset   '<id>|<owed key>' scored by deadline ms
//! {P}{sN}:closed             zset   [id,status,name,ik,created_at] JSON scored by closed_at ms
//! {P}{sN}:stream             stream append notifications (w=<id>, s=<last seq>)
//! {P}{sN}:idx:all            zset   id scored by created_at ms
//! {P}{sN}:idx:st:<status>    zset   the same, per status
//! {P}{sN}:idx:nm:<name>      zset   the same, per name
//! {P}{sN}:idx:ns:<status>:<name> zset per status and name
//! {P}{sK}:idem:<key>         string '<id>\n<NewWorkflow JSON>' (sK from the key itself)
//! ```

/// Builds the keys of one store (one prefix, a fixed number of shards).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    shards: u32,
}

/// 32-bit FNV-1a: stable across processes, versions and platforms.
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Keys {
    pub(crate) fn new(prefix: &str, shards: u32) -> Self {
        Self {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a workflow id or an idempotency key.
    pub(crate) fn shard_of(&self, s: &str) -> u32 {
        fnv1a(s) % self.shards
    }

    /// `<prefix>{sN}`: the start of every key of shard `n`.
    pub(crate) fn base(&self, shard: u32) -> String {
        format!("{}{{s{shard}}}", self.prefix)
    }

    /// `<prefix>{sN}:wf:`: the start of every workflow key of shard `n`.
    pub(crate) fn wf_prefix(&self, shard: u32) -> String {
        format!("{}:wf:", self.base(shard))
    }

    /// The keys of one workflow.
    pub(crate) fn workflow(&self, id: &str) -> WfKeys {
        let shard = self.shard_of(id);
        let base = self.base(shard);
        let wf = format!("{base}:wf:{id}");
        WfKeys {
            sum: format!("{wf}:sum"),
            ev: format!("{wf}:ev"),
            owed: format!("{wf}:owed"),
            dk: format!("{wf}:dk"),
            zowed: self.zowed(shard),
            stream: self.stream(shard),
            closed: self.closed(shard),
            base,
        }
    }

    pub(crate) fn zowed(&self, shard: u32) -> String {
        format!("{}:owed", self.base(shard))
    }

    pub(crate) fn closed(&self, shard: u32) -> String {
        format!("{}:closed", self.base(shard))
    }

    pub(crate) fn stream(&self, shard: u32) -> String {
        format!("{}:stream", self.base(shard))
    }

    /// The list index of shard `n` for an optional status and name filter.
    pub(crate) fn index(&self, shard: u32, status: Option<&str>, name: Option<&str>) -> String {
        let base = self.base(shard);
        match (status, name) {
            (None, None) => format!("{base}:idx:all"),
            (Some(st), None) => format!("{base}:idx:st:{st}"),
            (None, Some(nm)) => format!("{base}:idx:nm:{nm}"),
            (Some(st), Some(nm)) => format!("{base}:idx:ns:{st}:{nm}"),
        }
    }

    /// The idempotency claim of `key`, in the shard the key itself hashes to.
    pub(crate) fn idem(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.base(self.shard_of(key)))
    }
}

/// The keys one workflow's scripts touch (all in one slot).
#[derive(Debug, Clone)]
pub(crate) struct WfKeys {
    pub(crate) sum: String,
    pub(crate) ev: String,
    pub(crate) owed: String,
    pub(crate) dk: String,
    pub(crate) zowed: String,
    pub(crate) stream: String,
    pub(crate) closed: String,
    pub(crate) base: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        let k = Keys::new("m:", 16);
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        for id in ["a", "order-1", "x@y"] {
            assert!(k.shard_of(id) < 16);
            assert_eq!(k.shard_of(id), k.shard_of(id));
        }
        let w = k.workflow("a");
        assert!(
            w.sum
                .starts_with(&format!("m:{{s{}}}:wf:a", k.shard_of("a")))
        );
    }
}
