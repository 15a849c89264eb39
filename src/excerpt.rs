//! Outside input quoted in an error message, bounded: messages go back to callers and into
//! the log, so their size must not follow the input's (the fuzz targets check the bounds).

use std::borrow::Cow;

/// At most `max` characters of `s`, ending in "…" when cut.
pub fn excerpt(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => Cow::Owned(format!("{}…", &s[..cut])),
    }
}

/// The first `max_items` of `items`, each quoted and cut to `max` characters, then how many
/// more there are: `"a", "b" and 3 more`.
pub fn excerpt_list(items: &[String], max_items: usize, max: usize) -> String {
    let mut out = items
        .iter()
        .take(max_items)
        .map(|s| format!("{:?}", excerpt(s, max)))
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max_items {
        out += &format!(" and {} more", items.len() - max_items);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_characters_and_marks_the_cut() {
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("abcd", 3), "abc…");
        assert_eq!(excerpt("ééé", 2), "éé…");
        assert!(matches!(excerpt("abc", 3), Cow::Borrowed(_)));
    }

    #[test]
    fn lists_are_cut_in_count_and_length() {
        let items: Vec<String> = ["a", "bbbb", "c", "d"].map(String::from).into();
        assert_eq!(excerpt_list(&items, 2, 2), r#""a", "bb…" and 2 more"#);
        assert_eq!(excerpt_list(&items[..1], 2, 2), r#""a""#);
        assert_eq!(excerpt_list(&[], 2, 2), "");
    }
}
