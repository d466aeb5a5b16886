//! Drops the databases of one run of the tests or benches, in ClickHouse and
//! in MongoDB (FerretDB): those whose names carry its run id (see
//! `tests/support`'s `unique_name`). `scripts/lib.sh`'s `end_test_run` runs
//! it. An example rather than a script because dropping a MongoDB database
//! needs a MongoDB client, and the test tools have none besides the driver;
//! both stores are handled here so that which names belong to a run is
//! decided in one place.
//!
//! Usage: `drop_test_run_databases <clickhouse-url> <mongodb-uri> <run-id>`;
//! prints how many it dropped in each.

use std::error::Error;

use fhir_group_proxy::config::ClickHouseSettings;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(clickhouse_url), Some(mongo_uri), Some(run)) =
        (args.next(), args.next(), args.next())
    else {
        return Err(
            "usage: drop_test_run_databases <clickhouse-url> <mongodb-uri> <run-id>".into(),
        );
    };
    if !is_run_id(&run) {
        return Err(format!("{run:?} is not a run id (8 lowercase hex digits)").into());
    }

    let clickhouse = fhir_group_proxy::store::clickhouse::connect_server(&ClickHouseSettings {
        url: clickhouse_url,
        ..Default::default()
    });
    let mut clickhouse_dropped = 0;
    for name in clickhouse
        .query("SHOW DATABASES")
        .fetch_all::<String>()
        .await?
    {
        if is_of_run(&name, &run) {
            // The name is checked above: lowercase letters, `_` and hex only.
            clickhouse
                .query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute()
                .await?;
            clickhouse_dropped += 1;
        }
    }

    let mongo = mongodb::Client::with_uri_str(&mongo_uri).await?;
    let mut mongo_dropped = 0;
    for name in mongo.list_database_names().await? {
        if is_of_run(&name, &run) {
            mongo.database(&name).drop().await?;
            mongo_dropped += 1;
        }
    }
    println!("{clickhouse_dropped} ClickHouse and {mongo_dropped} MongoDB");
    Ok(())
}

fn is_run_id(run: &str) -> bool {
    run.len() == 8 && is_lower_hex(run)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<prefix>_<32 hex digits starting with the run id>`, as `unique_name`
/// makes them under a run.
fn is_of_run(name: &str, run: &str) -> bool {
    let Some((prefix, hex)) = name.rsplit_once('_') else {
        return false;
    };
    !prefix.is_empty()
        && prefix.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        && hex.len() == 32
        && is_lower_hex(hex)
        && hex.starts_with(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_run_match_and_others_do_not() {
        let run = "0badc0de";
        assert!(is_of_run("standin_0badc0de0123456789abcdef01234567", run));
        assert!(is_of_run("fgp_proxy_0badc0de0123456789abcdef01234567", run));
        // Another run's, one made outside a run, and the demo's are kept.
        assert!(!is_of_run("standin_0badc0df0123456789abcdef01234567", run));
        assert!(!is_of_run("standin_1234567890123456789abcdef0123456", run));
        assert!(!is_of_run("fhir_demo", run));
        assert!(!is_of_run("0badc0de0123456789abcdef01234567", run));
        assert!(!is_of_run("standin_0badc0de0123456789abcdef0123456", run));
    }

    #[test]
    fn run_ids_are_eight_lowercase_hex_digits() {
        assert!(is_run_id("0badc0de"));
        assert!(!is_run_id("0BADC0DE"));
        assert!(!is_run_id("0badc0d"));
        assert!(!is_run_id("0badc0de0"));
    }
}
