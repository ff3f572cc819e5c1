//! Small data files for unit tests, written here rather than by `datagen` (which lives
//! in the tools crate, above this one): compact records of `phones` phones with
//! `per_phone` calls each, durations whole seconds in 0..=120 (every tenth one on a
//! bucket boundary), grouped by phone or shuffled by a fixed permutation.

/// The records as data.json bytes.
pub(crate) fn records(phones: u64, per_phone: u64, shuffle: bool) -> Vec<u8> {
    let mut order: Vec<(u64, u64)> = (0..phones).flat_map(|p| (0..per_phone).map(move |i| (p, i))).collect();
    if shuffle {
        // A fixed xorshift permutation: reproducible, and scatters every phone's calls.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }
    let mut out = String::from("[");
    for (n, (phone, i)) in order.into_iter().enumerate() {
        let seconds = match i % 10 {
            0 => [10, 15, 30][(i / 10 % 3) as usize],
            _ => (phone * 31 + i * 17) % 121,
        };
        let start = 1_684_957_028_364 + i * 60_000;
        if n > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"phone":{phone},"start_date":{start},"end_date":{}}}"#, start + seconds * 1000));
    }
    out.push(']');
    out.into_bytes()
}
