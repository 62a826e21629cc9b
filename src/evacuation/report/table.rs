//! Lays the report's VM table out for where it is read: each column as wide
//! as its content, and, on a terminal narrower than that, narrowed where it
//! costs least, without ever making two different values look alike. A UUID
//! is cut to the shortest prefix that tells the rows apart (as git shortens
//! hashes), a name loses its middle (where a fleet's common prefix and its
//! distinguishing suffix are not), and the reason moves under the row
//! instead of being cut at all.

use std::collections::HashMap;

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// Marks where a value was cut.
const ELLIPSIS: &str = "…";
/// Between two columns.
const GAP: usize = 2;
/// A UUID prefix shorter than this is hard to search for in logs and Nova.
const PREFIX_FLOOR: usize = 8;
/// A name cut shorter than this no longer reads as a name.
const MIDDLE_FLOOR: usize = 10;
/// A reason column narrower than this wraps into too many lines: the reason
/// goes under its row instead.
const NOTE_COLUMN_FLOOR: usize = 30;
/// Indent of a reason under its row.
const NOTE_INDENT: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// How a column may be narrowed when the table does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fit {
    /// Never cut (states, numbers, host names, outcomes).
    Keep,
    /// Cut to the shortest prefix that keeps distinct values distinct (ids).
    Prefix,
    /// Cut in the middle, keeping both ends, as far as distinct values stay distinct (names).
    Middle,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Column {
    pub header: &'static str,
    pub align: Align,
    pub fit: Fit,
}

/// The table as text: `rows` hold one cell per column, `notes` one optional
/// free text per row (the reason), shown last under `note_header`. With a
/// `width`, lines are kept within it by cutting what may be cut, and `None`
/// when even that is not enough (the caller lays the rows out otherwise);
/// without one, nothing is cut.
pub(super) fn render(
    columns: &[Column],
    rows: &[Vec<String>],
    notes: &[Option<String>],
    note_header: &str,
    width: Option<usize>,
) -> Option<String> {
    let mut cells: Vec<Vec<String>> = (0..columns.len())
        .map(|c| rows.iter().map(|row| row.get(c).cloned().unwrap_or_default()).collect())
        .collect();
    let column_width = |c: usize, cells: &[Vec<String>]| {
        cells[c]
            .iter()
            .map(|cell| cell.width())
            .chain([columns[c].header.width()])
            .max()
            .unwrap_or(0)
    };
    let mut widths: Vec<usize> = (0..columns.len()).map(|c| column_width(c, &cells)).collect();
    let line_width = |widths: &[usize]| widths.iter().sum::<usize>() + GAP * widths.len().saturating_sub(1);

    // Ids first: a name is what an operator recognises; then names, in column order.
    let order = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.fit == Fit::Prefix)
        .chain(columns.iter().enumerate().filter(|(_, c)| c.fit == Fit::Middle))
        .map(|(i, c)| (i, c.fit))
        .collect::<Vec<_>>();
    if let Some(width) = width {
        for (c, fit) in order {
            let total = line_width(&widths);
            if total <= width {
                break;
            }
            let target = widths[c].saturating_sub(total - width);
            cells[c] = match fit {
                Fit::Prefix => shorten_prefix(&cells[c]),
                Fit::Middle => shorten_middle(&cells[c], target),
                Fit::Keep => continue,
            };
            widths[c] = column_width(c, &cells);
        }
    }

    let fixed = line_width(&widths);
    if width.is_some_and(|width| fixed > width) {
        return None;
    }
    let longest_note = notes.iter().flatten().map(|n| n.width()).max();
    // Where the reasons go: their own column (wrapped in it if need be), or under each row.
    let notes_at = match (longest_note, width) {
        (None, _) => Notes::None,
        (Some(_), None) => Notes::Column(usize::MAX),
        (Some(longest), Some(width)) if fixed + GAP + longest <= width => Notes::Column(usize::MAX),
        (Some(_), Some(width)) if width >= fixed + GAP + NOTE_COLUMN_FLOOR => Notes::Column(width - fixed - GAP),
        (Some(_), Some(width)) => Notes::Under(width.saturating_sub(NOTE_INDENT).max(NOTE_COLUMN_FLOOR)),
    };

    let mut out = String::new();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_string()).collect();
    let header_note = matches!(notes_at, Notes::Column(_)).then_some(note_header);
    push_line(&mut out, columns, &widths, &headers, header_note);
    for (r, note) in notes.iter().enumerate().take(rows.len()) {
        let row: Vec<String> = cells.iter().map(|column| column[r].clone()).collect();
        match (&notes_at, note) {
            (Notes::Column(room), Some(note)) => {
                let mut lines = wrap(note, *room).into_iter();
                push_line(&mut out, columns, &widths, &row, lines.next().as_deref());
                let blank = " ".repeat(fixed + GAP);
                for line in lines {
                    out.push_str(&blank);
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            (Notes::Under(room), Some(note)) => {
                push_line(&mut out, columns, &widths, &row, None);
                for line in wrap(note, *room) {
                    out.push_str(&" ".repeat(NOTE_INDENT));
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            _ => push_line(&mut out, columns, &widths, &row, None),
        }
    }
    Some(out)
}

enum Notes {
    None,
    /// Last column, wrapped at this width.
    Column(usize),
    /// Under the row, indented, wrapped at this width.
    Under(usize),
}

fn push_line(out: &mut String, columns: &[Column], widths: &[usize], cells: &[String], note: Option<&str>) {
    let mut line = String::new();
    for (c, cell) in cells.iter().enumerate() {
        if c > 0 {
            line.push_str(&" ".repeat(GAP));
        }
        let fill = " ".repeat(widths[c].saturating_sub(cell.width()));
        match columns[c].align {
            Align::Left => {
                line.push_str(cell);
                line.push_str(&fill);
            }
            Align::Right => {
                line.push_str(&fill);
                line.push_str(cell);
            }
        }
    }
    if let Some(note) = note {
        line.push_str(&" ".repeat(GAP));
        line.push_str(note);
    }
    // No padding left at the end of a line.
    out.push_str(line.trim_end());
    out.push('\n');
}

/// Cuts each value to the shortest prefix (and an ellipsis) that keeps
/// distinct values distinct, at least [`PREFIX_FLOOR`] columns. Once a UUID must be cut at all, a longer
/// prefix tells no more than the shortest distinct one: the columns go to
/// the reason instead, as git shortens hashes.
fn shorten_prefix(values: &[String]) -> Vec<String> {
    let natural = values.iter().map(|v| v.width()).max().unwrap_or(0);
    let cut = |keep: usize| -> Vec<String> {
        values
            .iter()
            .map(|v| {
                if v.width() <= keep + ELLIPSIS.width() {
                    v.clone()
                } else {
                    format!("{}{ELLIPSIS}", head(v, keep))
                }
            })
            .collect()
    };
    let mut keep = PREFIX_FLOOR;
    while keep + ELLIPSIS.width() < natural {
        let shortened = cut(keep);
        if keeps_apart(values, &shortened) {
            return shortened;
        }
        keep += 1;
    }
    values.to_vec()
}

/// Cuts each value wider than `target` to its two ends joined by an
/// ellipsis; widens the cut (up to no cut at all) until distinct values stay
/// distinct. Of the ways to share the columns between the ends, the most
/// even one that keeps them apart is taken, the end getting the odd column:
/// names of one fleet tend to differ at the end (`web-17`, `web-18`).
fn shorten_middle(values: &[String], target: usize) -> Vec<String> {
    let natural = values.iter().map(|v| v.width()).max().unwrap_or(0);
    let mut width = target.max(MIDDLE_FLOOR);
    while width < natural {
        let room = width - ELLIPSIS.width();
        let even = room / 2;
        // Head sizes from the even share outwards: even, even-1, even+1, even-2, ...
        let heads = (0..=room).map(|i| {
            if i % 2 == 0 {
                even + i / 2
            } else {
                even.wrapping_sub(i / 2 + 1)
            }
        });
        for keep_head in heads.filter(|h| *h <= room) {
            let shortened: Vec<String> = values
                .iter()
                .map(|v| {
                    if v.width() <= width {
                        v.clone()
                    } else {
                        format!("{}{ELLIPSIS}{}", head(v, keep_head), tail(v, room - keep_head))
                    }
                })
                .collect();
            if keeps_apart(values, &shortened) {
                return shortened;
            }
        }
        width += 1;
    }
    values.to_vec()
}

/// Whether no two different values were made to look alike.
fn keeps_apart(values: &[String], shortened: &[String]) -> bool {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    values
        .iter()
        .zip(shortened)
        .all(|(value, short)| *seen.entry(short.as_str()).or_insert(value.as_str()) == value.as_str())
}

/// The first characters of `text` that fill at most `columns`.
fn head(text: &str, columns: usize) -> String {
    let mut used = 0;
    text.chars()
        .take_while(|c| {
            used += c.width().unwrap_or(0);
            used <= columns
        })
        .collect()
}

/// The last characters of `text` that fill at most `columns`.
fn tail(text: &str, columns: usize) -> String {
    let mut used = 0;
    let mut kept: Vec<char> = text
        .chars()
        .rev()
        .take_while(|c| {
            used += c.width().unwrap_or(0);
            used <= columns
        })
        .collect();
    kept.reverse();
    kept.into_iter().collect()
}

/// `text` in lines of at most `columns`, broken between words (inside a word
/// only when the word alone is wider). A `quoted command` stays whole, even
/// if wider: it is there to be pasted.
pub(super) fn wrap(text: &str, columns: usize) -> Vec<String> {
    let columns = columns.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for mut word in words(text) {
        loop {
            let needed = if line.is_empty() {
                word.width()
            } else {
                line.width() + 1 + word.width()
            };
            if needed <= columns || (line.is_empty() && word.contains('`')) {
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(&word);
                break;
            }
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word wider than a line: its first columns on this line, the rest on the next.
            let mut first = head(&word, columns);
            if first.is_empty() {
                // A character wider than the line: it goes alone.
                first = word.chars().take(1).collect();
            }
            word = word[first.len()..].to_string();
            if word.is_empty() {
                line = first;
                break;
            }
            lines.push(first);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// The words of `text`, a `quoted span` counting as one.
fn words(text: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut open = false;
    for word in text.split_whitespace() {
        match words.last_mut() {
            Some(last) if open => {
                last.push(' ');
                last.push_str(word);
            }
            _ => words.push(word.to_string()),
        }
        if word.matches('`').count() % 2 == 1 {
            open = !open;
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn names_of_one_fleet_keep_their_distinguishing_ends() {
        // The old report cut these to `acc-admin-host1-179~`, all alike.
        let names = strings(&[
            "acc-admin-host1-1791-web",
            "acc-admin-host1-1792-web",
            "acc-admin-host1-1793-db",
            "other",
        ]);
        let short = shorten_middle(&names, 12);
        assert!(keeps_apart(&names, &short), "{short:?}");
        assert!(short.iter().all(|s| s.width() <= 12), "{short:?}");
        assert_eq!(short[3], "other");
        assert!(short[0].starts_with("acc-") && short[0].contains(ELLIPSIS), "{short:?}");
    }

    #[test]
    fn names_that_differ_only_in_the_middle_are_cut_elsewhere_or_less() {
        // An even cut (`eu-w…one-a`) would make them alike.
        let names = strings(&["eu-west-1-db-primary-zone-a", "eu-west-1-db-replica-zone-a"]);
        let short = shorten_middle(&names, 10);
        assert!(keeps_apart(&names, &short), "{short:?}");
        assert!(short.iter().all(|s| s.width() <= 10), "{short:?}");
    }

    #[test]
    fn equal_names_stay_equal_and_do_not_stop_the_cut() {
        // Nova allows two servers of one name; their ids tell them apart.
        let names = strings(&["same-name-for-two-servers", "same-name-for-two-servers"]);
        let short = shorten_middle(&names, 12);
        assert_eq!(short[0], short[1]);
        assert_eq!(short[0].width(), 12);
    }

    #[test]
    fn ids_are_cut_to_the_shortest_prefix_that_tells_them_apart() {
        let ids = strings(&[
            "6f1d3c2a-0000-4000-8000-000000000001",
            "6f1d3c2a-1111-4000-8000-000000000002",
            "0b7e9d10-2222-4000-8000-000000000003",
        ]);
        let short = shorten_prefix(&ids);
        assert_eq!(short, ["6f1d3c2a-0…", "6f1d3c2a-1…", "0b7e9d10-2…"]);
    }

    #[test]
    fn a_value_that_cannot_be_told_apart_when_cut_is_kept_whole() {
        let ids = strings(&["abcdefghij1", "abcdefghij2"]);
        assert_eq!(shorten_prefix(&ids), ids);
    }

    #[test]
    fn wide_characters_count_as_two_columns() {
        let names = strings(&["数据库服务器一号", "数据库服务器二号"]);
        let short = shorten_middle(&names, 11);
        assert!(keeps_apart(&names, &short), "{short:?}");
        assert!(short.iter().all(|s| s.width() <= 11), "{short:?}");
    }

    #[test]
    fn wrapping_breaks_between_words_and_inside_only_overlong_ones() {
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), [""]);
        assert_eq!(
            wrap("then `drainer -enable --node host1`; done", 12),
            ["then", "`drainer -enable --node host1`;", "done"]
        );
    }
}
