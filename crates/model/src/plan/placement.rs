//! Choosing which stages stay resident: the cheapest placement that fits the budget.

/// Where each stage's weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// Read once, on first use, and kept: later passes read nothing.
    Resident,
    /// Read before every pass that uses it and freed after.
    Streamed,
}

/// How the model's weights are placed, cheapest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Every stage resident after its first use.
    AllResident,
    /// Some stages resident, the rest streamed: a generation step re-reads only the
    /// streamed ones.
    Mixed,
    /// Every stage streamed, one (plus read-ahead) at a time.
    Streamed,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::AllResident => "all resident",
            Placement::Mixed => "some stages resident, the rest streamed",
            Placement::Streamed => "streamed stage by stage",
        })
    }
}

/// The bytes a stream of `sizes` (in execution order) holds at most at once: the stage
/// running plus up to `depth` read ahead, as [`crate::stream::LayerStream`] admits them
/// within `limit` (a stage that does not fit beside the ones alive waits; one alone is
/// always admitted).
pub(super) fn window(sizes: &[u64], depth: usize, limit: Option<u64>) -> u64 {
    (0..sizes.len())
        .map(|i| window_at(sizes, i, depth, limit))
        .max()
        .unwrap_or(0)
}

/// The bytes alive while stage `i` runs: it, plus the stages after it read ahead (up to
/// `depth`, while they fit within `limit` beside it).
pub(super) fn window_at(sizes: &[u64], i: usize, depth: usize, limit: Option<u64>) -> u64 {
    let mut held = sizes[i];
    for &next in sizes.iter().skip(i + 1).take(depth) {
        if limit.is_some_and(|limit| held + next > limit) {
            break;
        }
        held += next;
    }
    held
}

/// Which stages to keep resident when not all fit: at most `room` bytes of resident weights
/// beside a stream whose largest stage must also fit, keeping as many bytes resident as
/// possible (each byte kept is one a generation step does not read again).
///
/// For each candidate largest streamed stage `m`, every stage larger than `m` must stay
/// resident; of the rest, the largest are streamed until the resident ones fit beside `m`.
/// Returns the residency of each stage, or `None` when no choice keeps anything resident.
pub(super) fn mixed(sizes: &[u64], room: u64) -> Option<Vec<Residency>> {
    let mut best: Option<(u64, Vec<Residency>)> = None;
    let mut candidates: Vec<usize> = (0..sizes.len()).collect();
    candidates.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    for &first in &candidates {
        let m = sizes[first];
        if m > room {
            continue;
        }
        let cap = room - m;
        let mut residency = vec![Residency::Resident; sizes.len()];
        residency[first] = Residency::Streamed;
        let mut resident: u64 = sizes.iter().sum::<u64>() - m;
        // Stream the largest stages no larger than `m` until the rest fit.
        for &i in &candidates {
            if resident <= cap {
                break;
            }
            if i != first && sizes[i] <= m {
                residency[i] = Residency::Streamed;
                resident -= sizes[i];
            }
        }
        if resident > cap || resident == 0 {
            continue;
        }
        if best.as_ref().is_none_or(|(kept, _)| resident > *kept) {
            best = Some((resident, residency));
        }
    }
    best.map(|(_, residency)| residency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_read_ahead_within_the_limit() {
        let sizes = [250, 100, 100, 100, 250];
        assert_eq!(window(&sizes, 0, None), 250);
        assert_eq!(window(&sizes, 1, None), 350);
        assert_eq!(window(&sizes, 2, None), 450);
        // 100 + 100 fit in 300, 100 + 250 does not: the head waits.
        assert_eq!(window(&sizes, 1, Some(300)), 250);
        assert_eq!(window(&sizes, 2, Some(300)), 300);
        assert_eq!(window(&sizes, 2, Some(299)), 250);
        assert_eq!(window(&[100, 100, 100], 2, Some(300)), 300);
    }

    #[test]
    fn mixed_keeps_the_most_bytes_resident() {
        use Residency::*;
        // Room 600: streaming one 250 keeps 350 resident (250 + 100); streaming the
        // 100s instead (m = 100) keeps 500 resident.
        let sizes = [250, 100, 100, 100, 250];
        assert_eq!(
            mixed(&sizes, 600),
            Some(vec![Resident, Streamed, Streamed, Streamed, Resident])
        );
        // Room 400: m = 250 leaves 150 (one 100); m = 100 leaves 300 but both 250s are
        // larger than 100 and must stay (500): refused. One 100 resident.
        assert_eq!(
            mixed(&sizes, 400),
            Some(vec![Streamed, Streamed, Streamed, Resident, Streamed])
        );
        assert_eq!(mixed(&sizes, 300), None);
    }
}
