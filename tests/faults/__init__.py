"""Faults and load on a production-like topology (issue 12's "Done when"): `make faults`, and
`make test` runs them too. Each scenario is one test module:

- a. test_runtime_kill: the runtime killed (-9) while its agent runs a tool
- b. test_session_replica_kill: the replica running a turn and serving its watcher killed (-9)
- c. test_postgres_restart: `pg_ctl restart -m fast` mid-turn
- d. test_redis_restart: Redis stopped (about 5 s) and started again empty mid-stream
- e. test_identity_down: identity down when a turn ends
- f. test_pool_load: 20 users' turns at once on a pool of 8 agent processes
- g. test_ledger_concurrency: many users of one organisation reserving and settling at once

Each prints what it measured (times to recovery, in seconds, and what calls answered) and keeps
it in test-artifacts/faults.json; the run's summary lists them. When a scenario fails, the end of
every process's log is printed with it (the whole logs stay in pytest's temporary folder).
"""
