//! Marathon's `Store` on Redis: histories, summaries, indexes, timers and owed work, each atomic step one Lua script on one hash slot. (Work in progress.)
