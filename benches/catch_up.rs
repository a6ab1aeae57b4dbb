//! Catch-up benchmark (placeholder; the real one lives on main).
fn main() {}
