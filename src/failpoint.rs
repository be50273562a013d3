//! Named points where a test makes pgleap die as `kill -9` would, to prove
//! that a rerun finishes or undoes what a killed command left (the fault
//! suite kills the daemon at random points; a cutover's steps are too short
//! to hit by chance).
//!
//! `PGLEAP_FAILPOINT=NAME` aborts the process when it reaches the point
//! of that name: no destructor runs, no connection is closed cleanly, no
//! catalog row is written after it.
//!
//! `PGLEAP_PAUSEPOINT=NAME` holds the process at that point for three
//! seconds instead: long enough for a test to act while pgleap stands
//! there (another command's connect in the middle of a cutover).

/// Aborts here if `PGLEAP_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if std::env::var("PGLEAP_FAILPOINT").is_ok_and(|wanted| wanted == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    if std::env::var("PGLEAP_PAUSEPOINT").is_ok_and(|wanted| wanted == name) {
        eprintln!("pausepoint {name}: holding for 3 s");
        // Blocks the thread on purpose: nothing of this process moves on.
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}
