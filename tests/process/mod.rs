//! Running the real binary from integration tests.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};

/// Collects the child's stderr on a thread (a full pipe would block it);
/// the text so far is in the returned string.
pub fn drain_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipe = child.stderr.take().expect("stderr is piped");
    let text = Arc::clone(&stderr);
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut text = text.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    stderr
}
