//! One shared copy of each set of startup parameters a pool's sessions ask for. A checkout compares the tag of
//! every idle connection it looks at with the session's; when both point at the same copy the pointers settle
//! it, else the parameter lists are compared string by string. Sessions build their tag at login, each its
//! own, so without this every comparison took the slow way: 1.9% of the proxy's user time in transaction
//! pooling under `pgbench -S`, with 16 clients of one tenant.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::super::conn::StartupTag;

/// Tags remembered per pool. Past this many (after dropping those nobody holds), a new tag is used as it is
/// (still correct: compared by value) rather than remembered, so a client inventing parameters cannot grow
/// the table. A tag is at most a startup packet's size.
const MAX_TAGS: usize = 1024;
/// The table is first cleaned of tags nobody holds once it has this many.
const FIRST_CLEAN: usize = 64;

#[derive(Default)]
pub(super) struct Tags {
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// The table's own reference is one of each tag's: a tag only the table holds is dead.
    tags: HashSet<Arc<StartupTag>>,
    /// Size at which dead tags are dropped next: twice what was left after the last cleaning, so cleaning
    /// costs a constant per tag added, and dead tags never outnumber the live ones by much.
    clean_at: usize,
}

impl Tags {
    /// The pool's copy of `tag`: the one its connections and other sessions already hold when there is one.
    pub(super) fn intern(&self, tag: StartupTag) -> Arc<StartupTag> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = known.tags.get(&tag) {
            return shared.clone();
        }
        // (A full table is cleaned whenever a tag would not fit: an intern is once per session, not per
        // transaction.)
        if known.tags.len() >= known.clean_at.clamp(FIRST_CLEAN, MAX_TAGS) {
            known.tags.retain(|t| Arc::strong_count(t) > 1);
            known.clean_at = 2 * known.tags.len();
        }
        let shared = Arc::new(tag);
        if known.tags.len() < MAX_TAGS {
            known.tags.insert(shared.clone());
        }
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.lock().map(|k| k.tags.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(v: &str) -> StartupTag {
        StartupTag {
            params: vec![("application_name".into(), v.into())],
        }
    }

    #[test]
    fn equal_tags_share_one_copy() {
        let tags = Tags::default();
        let a = tags.intern(tag("x"));
        let b = tags.intern(tag("x"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &tags.intern(tag("y"))));
    }

    #[test]
    fn the_table_is_bounded_and_drops_tags_nobody_holds() {
        let tags = Tags::default();
        let held: Vec<_> = (0..MAX_TAGS + 10)
            .map(|i| tags.intern(tag(&i.to_string())))
            .collect();
        assert_eq!(tags.len(), MAX_TAGS);
        // Past the bound a tag still works, compared by value.
        assert_eq!(*held[MAX_TAGS + 5], tag(&(MAX_TAGS + 5).to_string()));
        drop(held);
        let _again = tags.intern(tag("new"));
        assert_eq!(tags.len(), 1);
        // Tags made and dropped one after another (a client inventing parameters) stay few.
        for i in 0..10_000 {
            drop(tags.intern(tag(&format!("gone {i}"))));
        }
        assert!(tags.len() <= FIRST_CLEAN + 1, "{}", tags.len());
    }
}
