//! One shared copy of each set of startup parameters a pool's sessions ask for. A checkout compares the tag of
//! every idle connection it looks at with the session's; when both point at the same copy the pointers settle
//! it, else the parameter lists are compared string by string. Sessions build their tag at login, each its
//! own, so without this every comparison took the slow way: 1.9% of the proxy's user time in transaction
//! pooling under `pgbench -S`, with 16 clients of one tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::super::conn::StartupTag;

/// Tags remembered per pool. Past this many live ones, a new tag is used as it is (still correct: compared by
/// value) rather than remembered, so a client inventing parameters cannot grow the table.
const MAX_TAGS: usize = 1024;

#[derive(Default)]
pub(super) struct Tags {
    known: Mutex<HashMap<StartupTag, Weak<StartupTag>>>,
}

impl Tags {
    /// The pool's copy of `tag`: the one its connections and other sessions already hold when there is one.
    pub(super) fn intern(&self, tag: StartupTag) -> Arc<StartupTag> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = known.get(&tag).and_then(Weak::upgrade) {
            return shared;
        }
        if known.len() >= MAX_TAGS {
            // Tags nobody holds any more (their sessions and connections are gone) make room.
            known.retain(|_, w| w.strong_count() > 0);
        }
        let shared = Arc::new(tag);
        if known.len() < MAX_TAGS {
            known.insert(StartupTag::clone(&shared), Arc::downgrade(&shared));
        }
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.lock().map(|k| k.len()).unwrap_or(0)
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
    fn equal_tags_share_one_copy_while_someone_holds_it() {
        let tags = Tags::default();
        let a = tags.intern(tag("x"));
        let b = tags.intern(tag("x"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &tags.intern(tag("y"))));
        drop((a, b));
        // Nobody holds "x" now: a new copy is made (and remembered in the old one's place).
        let c = tags.intern(tag("x"));
        assert!(Arc::ptr_eq(&c, &tags.intern(tag("x"))));
    }

    #[test]
    fn the_table_is_bounded_and_gives_room_back() {
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
    }
}
