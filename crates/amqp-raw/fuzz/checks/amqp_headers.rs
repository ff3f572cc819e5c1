//! The `amqp_headers` fuzz target's check, shared with the corpus replay in the crate's
//! tests (`tests/fuzz_replay.rs`): any bytes as an AMQP header table: the raw client's
//! validator says lapin cannot decode it exactly when lapin's own parser
//! (amq-protocol-types) fails, and neither the validator nor the raw decoder panics. A
//! wrong "decodable" would leave a poison message in the queue; a wrong "undecodable"
//! would dead-letter a good task.

use amqp_raw::{RawTable, table_problem};

pub(crate) fn check(data: &[u8]) {
    // lapin's parser recurses once per level: keep it within the fuzzer's stack.
    if data.len() > 4096 {
        return;
    }
    let mut framed = (data.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    let lapin_accepts =
        amq_protocol_types::parsing::parse_field_table(&framed[..]).is_ok_and(|(rest, _)| rest.is_empty());
    let problem = table_problem(data);
    assert_eq!(problem.is_none(), lapin_accepts, "validator says {problem:?}");
    // The raw decoder (keys as bytes, depth-bounded) never panics; when it decodes a
    // table lapin also decodes, the two agree on how many fields it has.
    let table = RawTable::from_bytes(data.to_vec());
    if let (Some(fields), Ok((_, parsed))) =
        (&table.fields, amq_protocol_types::parsing::parse_field_table(&framed[..]))
    {
        let distinct: std::collections::BTreeSet<&[u8]> = fields.iter().map(|(k, _)| &k[..]).collect();
        assert_eq!(distinct.len(), parsed.inner().len());
    }
}
