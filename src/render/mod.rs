pub mod junit;
pub mod paths;
pub mod table;

/// `1 case`, `2 cases`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
