//! The harness itself is tested against the real servers it starts.

use std::process::Command;
use std::time::Duration;

use shortener_common::testing::{TestPostgres, TestRedis, unique_name, wait_for};

fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for init to reap it is not running either.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Temp dirs of test processes that are gone (the shared servers' dirs are
/// never dropped) are swept when a new server starts; a live process's are
/// kept.
#[test]
fn server_dirs_of_gone_test_processes_are_swept() {
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let marked = |pid: u32| {
        let dir = tempfile::Builder::new()
            .prefix("test-redis-")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::write(dir.join("owner.pid"), pid.to_string()).unwrap();
        dir
    };
    let stale = marked(gone_pid);
    let live = marked(std::process::id());
    let redis = TestRedis::start();
    assert!(!stale.exists(), "{stale:?} left behind");
    assert!(live.exists());
    drop(redis);
    std::fs::remove_dir_all(live).unwrap();
}

#[test]
fn each_test_database_is_its_own() {
    let pg = TestPostgres::shared();
    let a = pg.create_database();
    let b = pg.create_database();
    assert_ne!(a, b);
    pg.psql_on(&a, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)");
    assert_eq!(pg.psql_on(&a, "SELECT x FROM t"), "42");
    assert_eq!(
        pg.psql_on(&b, "SELECT count(*) FROM pg_tables WHERE tablename = 't'"),
        "0"
    );
}

#[test]
fn redis_keeps_data_across_a_restart_with_aof() {
    let mut redis = TestRedis::start();
    let key = unique_name("harness");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("kept")
        .query(&mut conn)
        .unwrap();
    let old_pid = redis.pid().unwrap();

    redis.restart();
    assert!(process_is_gone(old_pid), "the old redis must be stopped");
    let mut conn = client.get_connection().unwrap();
    let value: String = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert_eq!(value, "kept");

    redis.stop();
    redis.start_empty();
    let mut conn = client.get_connection().unwrap();
    let value: Option<String> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert_eq!(value, None, "start_empty must lose the data");
}

#[test]
fn a_dropped_instance_is_stopped_by_pid() {
    let redis = TestRedis::start();
    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(process_is_gone(pid));
}

#[test]
fn postgres_stops_and_starts_again_with_its_data() {
    let mut pg = TestPostgres::start();
    pg.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)");
    pg.stop();
    let refused = Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .status();
    // pg_isready may not be on PATH; the restart below is the real check.
    if let Ok(status) = refused {
        assert!(!status.success(), "postgres still answers after stop");
    }
    pg.start_again();
    assert_eq!(pg.psql("SELECT x FROM kept"), "7");
}

/// Run by `servers_die_with_the_test_process` in a child process: starts the
/// shared servers, reports their pids, then ends the way `HARNESS_CHILD` says.
#[test]
fn harness_child_process() {
    let Ok(mode) = std::env::var("HARNESS_CHILD") else {
        return; // only meaningful inside the parent test below
    };
    let redis = TestRedis::shared().pid().unwrap();
    println!("REDIS_PID={redis}");
    match mode.as_str() {
        "panic" => panic!("a failing test"),
        "abort" => std::process::abort(),
        _ => {}
    }
}

#[test]
fn servers_die_with_the_test_process() {
    if std::env::var("HARNESS_CHILD").is_ok() || std::env::var("TEST_REDIS_URL").is_ok() {
        return;
    }
    for mode in ["exit", "panic", "abort"] {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "harness_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HARNESS_CHILD", mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let pid: u32 = stdout
            .lines()
            .find_map(|l| l.split_once("REDIS_PID=").map(|(_, pid)| pid.trim()))
            .unwrap_or_else(|| panic!("child printed no pid ({mode}): {stdout}"))
            .parse()
            .unwrap();
        assert_eq!(
            output.status.success(),
            mode == "exit",
            "{mode}: {:?}",
            output.status
        );
        wait_for(
            Duration::from_secs(10),
            &format!("redis {pid} to stop after the test process ended ({mode})"),
            || process_is_gone(pid),
        );
    }
}
