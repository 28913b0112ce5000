-- Every SQL statement of the coordinator, named; looked up by coordinator.queries.
-- Parameters are SQLAlchemy ":name" binds. Statements that change a batch fence on
-- (status, worker_id, lease_token) and read the clock of the database, never the client's.

-- name: touch_worker
-- The worker row of a token: created on first contact, refreshed on every call.
INSERT INTO workers (token_id, role, name, version)
VALUES (:token_id, :role, :name, :version)
ON CONFLICT (token_id) DO UPDATE
   SET last_seen_at = now(),
       name = COALESCE(:new_name, workers.name),
       version = COALESCE(:new_version, workers.version)
RETURNING id;

-- name: mark_workers_seen
-- The workers that called since the last write (coordinator.tokens.SeenCache), at once.
UPDATE workers SET last_seen_at = now() WHERE id = ANY(CAST(:ids AS int[]));

-- name: lease_pending_batch
-- Re-lease a batch that went back to pending (expired or released), with its candidates.
UPDATE batches b
   SET status = 'leased', worker_id = :worker_id, lease_token = :lease_token,
       lease_expires_at = now() + make_interval(secs => :ttl), attempts = b.attempts + 1,
       leased_at = now(), updated_at = now()
 WHERE b.id = (SELECT id FROM batches
                WHERE status = 'pending' AND size <= :max_size
                ORDER BY id LIMIT 1
                FOR UPDATE SKIP LOCKED)
   AND b.status = 'pending'
RETURNING b.id, b.lease_token, b.lease_expires_at, b.attempts;

-- name: anything_to_form
-- Whether a new batch could get any candidate: a pending chunk (the first id of
-- pending_chunks_pkey; an ORDER BY ... LIMIT 1 subquery, not EXISTS, which the planner
-- would turn into a seq scan that reads every dead heap tuple after a drain) or a due
-- retry (the first entry of retry_chunks_due). Read before a batch is inserted, so an
-- empty queue costs two index probes instead of an insert, a sample, an index claim
-- and a rollback. The retry probe comes first: OR stops at the first true operand, and
-- after a drain the walk past the deleted chunks' entries is the costly one.
SELECT (SELECT not_before FROM retry_chunks ORDER BY not_before LIMIT 1) <= now()
    OR (SELECT id FROM pending_chunks ORDER BY id LIMIT 1) IS NOT NULL
       AS found;

-- name: anything_left
-- Whether anything would be left to lease after this transaction's claim: a pending
-- batch, a pending chunk or a due retry (each one index probe). A lease-ahead that would
-- take the last of the queue is refused on it (the worker asks again once its batch ended).
SELECT (SELECT id FROM batches WHERE status = 'pending' ORDER BY id LIMIT 1) IS NOT NULL
    OR (SELECT id FROM pending_chunks ORDER BY id LIMIT 1) IS NOT NULL
    OR (SELECT not_before FROM retry_chunks ORDER BY not_before LIMIT 1) <= now()
       AS found;

-- name: insert_leased_batch
INSERT INTO batches (status, worker_id, lease_token, lease_expires_at, attempts, leased_at)
VALUES ('leased', :worker_id, :lease_token, now() + make_interval(secs => :ttl), 1, now())
RETURNING id, lease_token, lease_expires_at, attempts;

-- name: table_size_estimate
-- Planner statistics of pending_chunks: rows (-1 before the first ANALYZE) and pages.
SELECT reltuples::bigint AS rows, relpages::bigint AS pages
  FROM pg_class WHERE oid = 'pending_chunks'::regclass;

-- name: max_chunk_id
SELECT COALESCE(max(id), 0) AS max_id FROM pending_chunks;

-- name: _store_claimed
-- The common tail of claim_sampled and claim_by_index, spliced in after their "picked"
-- CTE (the locked chunks: ctid, ids, and r, the order in which they were picked). The
-- batch takes whole chunks in that order while they fit in :n, then the first ids of the
-- chunk that crosses :n (the rest of that chunk goes back as a new chunk, its fragments
-- split at the same element); picked chunks past it stay as they are. The taken chunks
-- are deleted (RETURNING their fragments). The lease body's parts: each whole chunk's
-- fragments and the crossing chunk's first elements, joined in order of each part's
-- first id (coordinator.payload); the ids of taken chunks that carry no fragments come
-- back in read_ids (the lease reads their candidates). The batch's members are stored
-- once, from the body (store_members).
ranked AS MATERIALIZED (
    SELECT p.ctid, p.ids, cardinality(p.ids) AS len,
           sum(cardinality(p.ids)) OVER (ORDER BY p.r) AS upto
      FROM picked p
), used AS MATERIALIZED (
    SELECT r.ctid, r.ids, r.len, CAST(LEAST(r.len, :n - (r.upto - r.len)) AS int) AS keep
      FROM ranked r
     WHERE r.upto - r.len < :n
), taken AS MATERIALIZED (
    DELETE FROM pending_chunks c
     WHERE c.ctid = ANY (ARRAY(SELECT ctid FROM used))
    RETURNING c.ids, c.url_j, c.caption_j, c.language_j, c.extra_j,
              pg_column_size(c.ids) + COALESCE(pg_column_size(c.url_j) + pg_column_size(c.caption_j)
                  + pg_column_size(c.language_j) + pg_column_size(c.extra_j), 0) AS bytes
), took AS MATERIALIZED (
    SELECT t.*, u.len, u.keep FROM taken t JOIN used u ON u.ids[1] = t.ids[1]
), split AS MATERIALIZED (
    SELECT t.keep, e.k, e.id, e.url, e.caption, e.language, e.extra
      FROM took t
     CROSS JOIN LATERAL ROWS FROM (
            unnest(t.ids),
            json_array_elements(CAST('[' || t.url_j || ']' AS json)),
            json_array_elements(CAST('[' || t.caption_j || ']' AS json)),
            json_array_elements(CAST('[' || t.language_j || ']' AS json)),
            json_array_elements(CAST('[' || t.extra_j || ']' AS json))
          ) WITH ORDINALITY AS e(id, url, caption, language, extra, k)
     WHERE t.keep < t.len
), leftover AS (
    INSERT INTO pending_chunks (ids, url_j, caption_j, language_j, extra_j)
    SELECT array_agg(id ORDER BY k), string_agg(url::text, ',' ORDER BY k),
           string_agg(caption::text, ',' ORDER BY k),
           string_agg(language::text, ',' ORDER BY k),
           string_agg(extra::text, ',' ORDER BY k)
      FROM split WHERE k > keep HAVING count(*) > 0
), parts AS (
    SELECT ids[1] AS first, len AS n, array_to_string(ids, ',') AS id_j, url_j,
           caption_j, language_j, extra_j
      FROM took WHERE keep = len AND url_j IS NOT NULL
    UNION ALL
    SELECT min(id), count(*), string_agg(id::text, ',' ORDER BY k),
           string_agg(url::text, ',' ORDER BY k), string_agg(caption::text, ',' ORDER BY k),
           string_agg(language::text, ',' ORDER BY k), string_agg(extra::text, ',' ORDER BY k)
      FROM split WHERE k <= keep AND url IS NOT NULL HAVING count(*) > 0
), body AS (
    SELECT COALESCE(sum(n), 0) AS carried, string_agg(id_j, ',' ORDER BY first) AS id_j,
           string_agg(url_j, ',' ORDER BY first) AS url_j,
           string_agg(caption_j, ',' ORDER BY first) AS caption_j,
           string_agg(language_j, ',' ORDER BY first) AS language_j,
           string_agg(extra_j, ',' ORDER BY first) AS extra_j
      FROM parts
), claimed AS (
    -- the ids stored (n), the chunks and ids picked, their average bytes, the ids to
    -- read from candidates, and the body's fragments (carried: how many candidates)
    SELECT (SELECT COALESCE(sum(keep), 0) FROM used) AS n,
           (SELECT count(*) FROM ranked) AS chunks,
           (SELECT COALESCE(sum(len), 0) FROM ranked) AS ids,
           (SELECT avg(bytes) FROM taken) AS row_bytes,
           (SELECT array_agg(m.id) FROM took, unnest(took.ids[1:took.keep]) AS m(id)
             WHERE took.url_j IS NULL) AS read_ids,
           body.*
      FROM body
)

-- name: claim_sampled
-- Fill batch :batch_id with up to :n candidates from a sample: TABLESAMPLE SYSTEM picks
-- whole pages of pending_chunks (the caller adapts the percentage to the yield it
-- observes); the sampled chunks are shuffled, up to :chunks of them locked (SKIP LOCKED:
-- chunks another lease holds are passed over) and taken as _store_claimed says. A chunk
-- that a concurrent lease deleted meanwhile cannot be locked and is passed over too; a
-- row can be deleted only once, so no two batches share a candidate. Returns the ids
-- stored (n), the chunks and ids picked, their average bytes, the sample's size in
-- chunks, the body's fragments (carried: how many candidates) and read_ids.
WITH sample AS MATERIALIZED (
    SELECT ctid FROM pending_chunks TABLESAMPLE SYSTEM (CAST(:pct AS real))
), picked AS (
    SELECT p.ctid, p.ids, random() AS r FROM pending_chunks p
     WHERE p.ctid = ANY (ARRAY(SELECT ctid FROM sample))
     ORDER BY 3
     LIMIT :chunks
       FOR UPDATE SKIP LOCKED
), {_store_claimed}
SELECT claimed.*, (SELECT count(*) FROM sample) AS sampled FROM claimed;

-- name: claim_by_index
-- Fallback when a sample comes back short: :chunks pending chunks in id order from
-- :start (the primary key), skipping locked rows; taken as in claim_sampled.
WITH picked AS (
    SELECT ctid, ids, id AS r FROM pending_chunks
     WHERE id >= :start
     ORDER BY id
     LIMIT :chunks
       FOR UPDATE SKIP LOCKED
), {_store_claimed}
SELECT * FROM claimed;

-- name: _candidate_fragments
-- The lease payload's JSON array fragments of the candidates "c" (url, caption,
-- language: null when none, extra: {} when none) in id order, as the ingest writes them
-- (coordinator.ingest.loader.chunk_fragments).
string_agg(to_json(c.url)::text, ',' ORDER BY c.id) AS url_j,
string_agg(to_json(c.caption)::text, ',' ORDER BY c.id) AS caption_j,
string_agg(COALESCE(to_json(c.language)::text, 'null'), ',' ORDER BY c.id) AS language_j,
string_agg(COALESCE(c.extra::text, '{}'), ',' ORDER BY c.id) AS extra_j

-- name: candidate_fragments
-- The lease body's part for candidates that came without fragments (:ids: retries,
-- chunks that carry none; :attempts, element for element, their attempts) as JSON
-- array fragments in id order, each candidate's attempt included. Each is read by
-- candidates_pkey.
SELECT count(*) AS n,
       string_agg(c.id::text, ',' ORDER BY c.id) AS id_j,
       {_candidate_fragments},
       string_agg(a.attempt::text, ',' ORDER BY c.id) AS attempt_j
  FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS smallint[])) AS a(id, attempt)
  JOIN candidates c ON c.id = a.id;

-- name: chunk_candidates
-- Pending chunks of 16 consecutive ids (id / 16) carrying their fragments, for the
-- candidates :first..:last: how the tests and the load simulator give a synthetic farm
-- the pending chunks that pairfarm ingest writes from Arrow.
INSERT INTO pending_chunks (ids, url_j, caption_j, language_j, extra_j)
SELECT array_agg(c.id ORDER BY c.id), {_candidate_fragments}
  FROM candidates c
 WHERE c.id BETWEEN :first AND :last
 GROUP BY c.id / 16
 ORDER BY c.id / 16;

-- name: batch_candidates
-- A re-leased batch's candidates in key order, the order of its batch_members array
-- (element i is written under key_of(i), as at its first lease), as the JSON of
-- pairfarm.protocol.CandidateColumns built by the server: one array per field, so 10k
-- rows never become Python objects on the way to the worker, and the worker parses
-- five arrays instead of 10k objects. Each member is read by candidates_pkey. A
-- candidate's attempt is its element of the batch's attempts (NULL: 1).
SELECT count(*) AS n,
       json_build_object(
           'id', COALESCE(array_agg(c.id ORDER BY m.k), '{}'),
           'url', COALESCE(array_agg(c.url ORDER BY m.k), '{}'),
           'caption', COALESCE(array_agg(c.caption ORDER BY m.k), '{}'),
           'language', COALESCE(array_agg(c.language ORDER BY m.k), '{}'),
           'extra', COALESCE(array_agg(COALESCE(c.extra, '{}'::json) ORDER BY m.k), '{}'),
           'attempt', COALESCE(array_agg(COALESCE(b.attempts[m.k], 1) ORDER BY m.k), '{}')
       )::text AS candidates
  FROM batch_members b
 CROSS JOIN LATERAL unnest(b.ids) WITH ORDINALITY AS m(id, k)
  JOIN candidates c ON c.id = m.id
 WHERE b.batch_id = :batch_id;

-- name: claim_retries
-- Take up to :n candidates that wait for a retry and are due: up to :chunks retry
-- chunks, the longest due first (retry_chunks_due), locked SKIP LOCKED (chunks a
-- concurrent lease holds are passed over; one it deleted cannot be locked). Whole chunks
-- while they fit in :n, then the first ids of the chunk that crosses :n (its rest goes
-- back as a new chunk, same attempt and not_before); picked chunks past it stay. The
-- taken chunks are deleted: no two batches get a candidate. Returns how many chunks were
-- picked, how many candidates taken (n), their ids and their attempts as comma-separated
-- text, element for element (the lease reads their candidates and stores them as
-- members).
WITH picked AS (
    SELECT ctid, id, not_before, attempt, ids FROM retry_chunks
     WHERE not_before <= now()
     ORDER BY not_before, id
     LIMIT :chunks
       FOR UPDATE SKIP LOCKED
), ranked AS MATERIALIZED (
    SELECT p.*, cardinality(p.ids) AS len,
           sum(cardinality(p.ids)) OVER (ORDER BY p.not_before, p.id) AS upto
      FROM picked p
), used AS MATERIALIZED (
    SELECT r.*, CAST(LEAST(r.len, :n - (r.upto - r.len)) AS int) AS keep
      FROM ranked r
     WHERE r.upto - r.len < :n
), taken AS (
    DELETE FROM retry_chunks c WHERE c.ctid = ANY (ARRAY(SELECT ctid FROM used))
), leftover AS (
    INSERT INTO retry_chunks (not_before, attempt, ids)
    SELECT not_before, attempt, ids[keep + 1:] FROM used WHERE keep < len
)
SELECT (SELECT count(*) FROM ranked) AS chunks, COALESCE(sum(u.keep), 0) AS n,
       string_agg(array_to_string(u.ids[1:u.keep], ','), ',' ORDER BY u.not_before, u.id)
           AS id_j,
       string_agg(array_to_string(array_fill(u.attempt, ARRAY[u.keep]), ','), ','
                  ORDER BY u.not_before, u.id) AS attempt_j
  FROM used u;

-- name: store_members
-- A new batch's members, in the order of its lease body (element i is key_of(i)): the
-- body's id fragments joined, as array text ("{1,2,...}"), parsed here, their attempts
-- (NULL: all first attempts) in the same way; and its size.
WITH sized AS (UPDATE batches SET size = :size WHERE id = :batch_id)
INSERT INTO batch_members (batch_id, ids, attempts)
VALUES (:batch_id, CAST(:ids AS bigint[]), CAST(:attempts AS smallint[]));

-- name: queue_retries
-- At a download completion, after the fence, in its transaction: of the candidates the
-- report sends back (:ids, with their outcome classes :classes), those that are members
-- of batch :batch_id at an attempt <= :max_retries (their element of the batch's
-- attempts; NULL: 1) wait for a later batch: retry chunks of up to :chunk_ids of them
-- (one group per attempt, ids in id order) at the next attempt, due :delay x :growth ^
-- (attempt - 1) seconds from now; they leave the batch's members (and attempts).
-- Returns the ids asked, those that are members, and those sent back by outcome class
-- (JSON); the caller refuses the report unless all agree (rolling back).
WITH asked AS (
    SELECT a.id, a.outcome
      FROM unnest(CAST(:ids AS bigint[]), CAST(:classes AS text[])) AS a(id, outcome)
), members AS MATERIALIZED (
    SELECT m.id, m.k, COALESCE(b.attempts[m.k], 1) AS attempt
      FROM batch_members b
     CROSS JOIN LATERAL unnest(b.ids) WITH ORDINALITY AS m(id, k)
     WHERE b.batch_id = :batch_id
), tried AS MATERIALIZED (
    SELECT a.id, a.outcome, m.k, m.attempt FROM asked a JOIN members m ON m.id = a.id
), queued AS MATERIALIZED (
    SELECT id, k, attempt, outcome FROM tried WHERE attempt <= :max_retries
), chunked AS (
    INSERT INTO retry_chunks (not_before, attempt, ids)
    SELECT now() + make_interval(secs => CAST(:delay AS float8)
                                         * power(CAST(:growth AS float8), attempt - 1)),
           attempt + 1, array_agg(id ORDER BY id)
      FROM (SELECT id, attempt,
                   (row_number() OVER (PARTITION BY attempt ORDER BY id) - 1)
                       / :chunk_ids AS g
              FROM queued) AS q
     GROUP BY attempt, g
), kept AS MATERIALIZED (
    SELECT m.id, m.k, m.attempt FROM members m
     WHERE NOT EXISTS (SELECT FROM queued q WHERE q.k = m.k)
), left_members AS (
    UPDATE batch_members b
       SET ids = ARRAY(SELECT id FROM kept ORDER BY k),
           attempts = CASE WHEN b.attempts IS NOT NULL
                           THEN ARRAY(SELECT attempt FROM kept ORDER BY k) END
     WHERE b.batch_id = :batch_id AND EXISTS (SELECT FROM queued)
)
SELECT (SELECT count(*) FROM asked) AS asked, (SELECT count(*) FROM tried) AS members,
       (SELECT COALESCE(jsonb_object_agg(outcome, n), '{}')
          FROM (SELECT outcome, count(*) AS n FROM queued GROUP BY outcome) AS s)::text
           AS queued;

-- name: lock_batch
SELECT id, status, size, worker_id, lease_token, attempts, pp_attempts, outcomes,
       shard, download_digest, postprocess_digest
  FROM batches WHERE id = :batch_id
   FOR UPDATE;

-- name: heartbeat
UPDATE batches
   SET lease_expires_at = now() + make_interval(secs => :ttl), updated_at = now()
 WHERE id = :batch_id AND status = :status AND worker_id = :worker_id
   AND lease_token = :lease_token
RETURNING lease_expires_at;

-- name: complete_download
-- :outcomes, :size and :retried leave out the candidates queue_retries sent back.
UPDATE batches
   SET status = 'downloaded', shard = CAST(:shard AS jsonb), tar_sha256 = :tar_sha256,
       outcomes = CAST(:outcomes AS jsonb), bytes_downloaded = :bytes_downloaded,
       size = :size, retried = :retried,
       download_s = :duration_s, download_digest = :digest, downloaded_by = worker_id,
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, last_error = NULL,
       downloaded_at = now(), updated_at = now()
 WHERE id = :batch_id AND status = 'leased' AND worker_id = :worker_id
   AND lease_token = :lease_token
RETURNING id, status, attempts;

-- name: lease_downloaded_batch
-- Hand a written shard to a post-processing node.
UPDATE batches b
   SET status = 'postprocessing', worker_id = :worker_id, lease_token = :lease_token,
       lease_expires_at = now() + make_interval(secs => :ttl),
       pp_attempts = b.pp_attempts + 1, updated_at = now()
 WHERE b.id = (SELECT id FROM batches WHERE status = 'downloaded'
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
   AND b.status = 'downloaded'
RETURNING b.id, b.lease_token, b.lease_expires_at, b.pp_attempts AS attempts, b.shard,
          b.outcomes;

-- name: complete_postprocess
UPDATE batches
   SET status = 'done', postprocess = CAST(:report AS jsonb), kept = :kept,
       dropped = :dropped, postprocess_digest = :digest,
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, last_error = NULL,
       done_at = now(), updated_at = now()
 WHERE id = :batch_id AND status = 'postprocessing' AND worker_id = :worker_id
   AND lease_token = :lease_token
RETURNING id, status, attempts;

-- name: give_back
-- A holder gives its lease back: to :back_to, or to failed once :exhausted.
UPDATE batches
   SET status = CASE WHEN :exhausted THEN 'failed' ELSE CAST(:back_to AS text) END,
       attempts = attempts - CAST(:refund AS int),
       pp_attempts = pp_attempts - CAST(:pp_refund AS int),
       last_error = :reason, last_worker_id = worker_id, worker_id = NULL,
       lease_token = NULL, lease_expires_at = NULL, updated_at = now()
 WHERE id = :batch_id AND status = :status AND worker_id = :worker_id
   AND lease_token = :lease_token
RETURNING id, status, attempts;

-- name: reap_lock
-- Taken by a reaper pass before reap_expired, until its transaction ends: with several
-- coordinator processes on one database one of them reaps at a time, the others skip
-- their pass (false). The key is pairfarm's own ('pfreap' in ASCII).
SELECT pg_try_advisory_xact_lock(112102114101097112) AS got;

-- name: reap_expired
-- Expired leases go back (download: pending, post-processing: downloaded) or, once
-- their attempts are spent, to failed with the reason. Rows being changed are skipped.
-- "held" is the status the lease had (which kind of client held it).
WITH expired AS (
    SELECT id, status AS held FROM batches
     WHERE status IN ('leased', 'postprocessing') AND lease_expires_at < now()
       FOR UPDATE SKIP LOCKED
)
UPDATE batches b
   SET status = CASE
           WHEN b.status = 'leased' AND b.attempts >= :max_attempts THEN 'failed'
           WHEN b.status = 'leased' THEN 'pending'
           WHEN b.pp_attempts >= :max_attempts THEN 'failed'
           ELSE 'downloaded' END,
       last_error = CASE
           WHEN b.status = 'leased' THEN 'download lease expired (attempt '
                || b.attempts || ' of ' || :max_attempts || ')'
           ELSE 'post-processing lease expired (attempt '
                || b.pp_attempts || ' of ' || :max_attempts || ')' END,
       last_worker_id = b.worker_id, worker_id = NULL, lease_token = NULL,
       lease_expires_at = NULL, updated_at = now()
  FROM expired
 WHERE b.id = expired.id
RETURNING b.id, b.status, expired.held;

-- name: worker_quarantine
-- The quarantine a download worker is in now, if any (pairfarm's lease refuses it).
SELECT quarantine_reason AS reason,
       extract(epoch FROM quarantined_until - now())::float8 AS seconds_left
  FROM workers
 WHERE id = :worker_id AND quarantined_until > now();

-- name: worker_failed
-- A failure the worker reported: one more in its run (a run older than :window seconds
-- starts again at 1). At :after failures in a row (0: never) the worker is quarantined
-- for :quarantine seconds, with :reason, and its run starts again.
WITH run AS (
    SELECT id,
           CASE WHEN failing_since > now() - make_interval(secs => :window)
                THEN failures_in_row + 1 ELSE 1 END AS n,
           CASE WHEN failing_since > now() - make_interval(secs => :window)
                THEN failing_since ELSE now() END AS since
      FROM workers WHERE id = :worker_id
), judged AS (
    SELECT id, n, since, :after > 0 AND n >= :after AS quarantine FROM run
)
UPDATE workers w
   SET failures_in_row = CASE WHEN j.quarantine THEN 0 ELSE j.n END,
       failing_since = CASE WHEN j.quarantine THEN NULL ELSE j.since END,
       quarantined_until = CASE WHEN j.quarantine
           THEN now() + make_interval(secs => :quarantine) ELSE w.quarantined_until END,
       quarantine_reason = CASE WHEN j.quarantine
           THEN j.n || ' batches in a row failed on this worker, the last: ' || :reason
           ELSE w.quarantine_reason END
  FROM judged j
 WHERE w.id = j.id
RETURNING j.quarantine;

-- name: worker_completed
-- A completed batch ends the worker's run of failures.
UPDATE workers SET failures_in_row = 0, failing_since = NULL
 WHERE id = :worker_id AND failures_in_row > 0;

-- name: _selected_batches
-- The batches an operator names (pairfarm batches list|requeue): in one of :states;
-- when given, whose last_error contains :reason (case-insensitive), held last by the
-- client :worker (its id, its registered name or its token's name), with an id in :ids.
batches b
  LEFT JOIN workers w ON w.id = COALESCE(b.worker_id, b.last_worker_id)
  LEFT JOIN tokens t ON t.id = w.token_id
 WHERE b.status = ANY (CAST(:states AS text[]))
   AND (CAST(:reason AS text) IS NULL
        OR strpos(lower(b.last_error), lower(CAST(:reason AS text))) > 0)
   AND (CAST(:worker AS text) IS NULL OR CAST(w.id AS text) = :worker
        OR w.name = :worker OR t.name = :worker)
   AND (cardinality(CAST(:ids AS bigint[])) = 0 OR b.id = ANY (CAST(:ids AS bigint[])))

-- name: select_batches
SELECT b.id, b.status, b.size, b.attempts, b.pp_attempts, b.last_error, b.updated_at,
       w.id AS worker_id, w.name AS worker_name
  FROM {_selected_batches}
 ORDER BY b.id;

-- name: requeue_batches
-- Give the selected batches back to the queue: a batch without a shard to pending
-- (download attempts reset), one with a shard (it failed in post-processing) to
-- downloaded (post-processing attempts reset). A lease it held is fenced out: its lease
-- token is cleared, so the holder's heartbeat, completion or failure gets 409. The batch
-- keeps its candidates (batch_members), so each candidate stays in exactly one batch.
WITH chosen AS (
    SELECT b.id FROM {_selected_batches}
       FOR UPDATE OF b
)
UPDATE batches
   SET status = CASE WHEN shard IS NULL THEN 'pending' ELSE 'downloaded' END,
       attempts = CASE WHEN shard IS NULL THEN 0 ELSE attempts END,
       pp_attempts = 0, last_worker_id = COALESCE(worker_id, last_worker_id),
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
  FROM chosen
 WHERE batches.id = chosen.id
RETURNING batches.id, batches.status, batches.size;

-- name: insert_token
INSERT INTO tokens (role, name, token_sha256) VALUES (:role, :name, :token_sha256)
RETURNING id;

-- name: token_by_hash
SELECT id, role, name FROM tokens
 WHERE token_sha256 = :token_sha256 AND revoked_at IS NULL;

-- name: revocation_mark
-- What moves when a token is revoked (tokens are never deleted or un-revoked): read by
-- each coordinator process at most once per --revocation-check to empty its token cache.
SELECT count(*) AS revoked, max(revoked_at) AS latest FROM tokens
 WHERE revoked_at IS NOT NULL;

-- name: list_tokens
SELECT t.id, t.role, t.name, t.created_at, t.revoked_at, w.last_seen_at
  FROM tokens t LEFT JOIN workers w ON w.token_id = t.id
 ORDER BY t.id;

-- name: revoke_token
UPDATE tokens SET revoked_at = now()
 WHERE (id = :id OR name = :name) AND revoked_at IS NULL
RETURNING id, role, name;

-- name: stats_batches
-- Batches and their candidates by status: the hot ones plus the archived totals.
SELECT status, sum(batches) AS batches, sum(candidates) AS candidates
  FROM (SELECT status, count(*) AS batches, COALESCE(sum(size), 0) AS candidates
          FROM batches GROUP BY status
        UNION ALL
        SELECT status, batches, candidates FROM archived_totals) AS s
 GROUP BY status;

-- name: largest_waiting_batch
-- The largest batch still to download: a batch size below it would never re-lease it.
SELECT COALESCE(max(size), 0) AS size FROM batches WHERE status IN ('pending', 'leased');

-- name: stats_totals
SELECT (SELECT COALESCE(sum(bytes_downloaded), 0) FROM batches)
           + (SELECT COALESCE(sum(bytes_downloaded), 0) FROM archived_totals)
           AS bytes_downloaded,
       (SELECT COALESCE(sum(kept), 0) FROM batches)
           + (SELECT COALESCE(sum(kept), 0) FROM archived_totals) AS kept,
       (SELECT COALESCE(sum(dropped), 0) FROM batches)
           + (SELECT COALESCE(sum(dropped), 0) FROM archived_totals) AS dropped;

-- name: stats_outcomes
SELECT outcome, sum(total) AS total
  FROM (SELECT o.key AS outcome, o.value::bigint AS total
          FROM batches b, jsonb_each_text(b.outcomes) AS o
         WHERE b.outcomes IS NOT NULL
        UNION ALL
        SELECT outcome, total FROM archived_outcomes) AS s
 GROUP BY outcome;

-- name: stats_retries
-- Candidates sent back for a retry (hot and archived batches), and those waiting now.
SELECT (SELECT COALESCE(sum(retried), 0) FROM batches)
           + (SELECT COALESCE(sum(retried), 0) FROM archived_totals) AS retried,
       (SELECT COALESCE(sum(cardinality(ids)), 0) FROM retry_chunks) AS waiting;

-- name: stats_ingested
SELECT COALESCE(sum(inserted), 0) AS inserted FROM ingests;

-- name: stats_workers
-- Clients seen within :window seconds, the batches they hold, and for how long (within
-- :rate_window) they have been registered, the span their download rate is taken over.
SELECT w.id, w.name, w.role, w.version, w.last_seen_at,
       extract(epoch FROM now() - w.last_seen_at)::float8 AS last_seen_s,
       CASE WHEN w.quarantined_until > now() THEN w.quarantined_until END
           AS quarantined_until,
       CASE WHEN w.quarantined_until > now() THEN w.quarantine_reason END
           AS quarantine_reason,
       GREATEST(1.0, LEAST(CAST(:rate_window AS float8),
                           extract(epoch FROM now() - w.registered_at)::float8)) AS span_s,
       array_remove(array_agg(b.id ORDER BY b.id), NULL) AS batches
  FROM workers w LEFT JOIN batches b ON b.worker_id = w.id
 WHERE w.last_seen_at > now() - make_interval(secs => :window)
 GROUP BY w.id
 ORDER BY w.id;

-- name: stats_worker_downloads
-- Candidates each download worker completed: in all (archived batches included), and
-- within :rate_window seconds.
SELECT worker_id, sum(total) AS total, sum(recent) AS recent
  FROM (SELECT downloaded_by AS worker_id, sum(size) AS total,
               COALESCE(sum(size) FILTER (
                   WHERE downloaded_at > now() - make_interval(secs => :rate_window)), 0)
                   AS recent
          FROM batches
         WHERE downloaded_by IS NOT NULL
         GROUP BY downloaded_by
        UNION ALL
        SELECT worker_id, candidates, 0 FROM archived_worker_downloads) AS s
 GROUP BY worker_id;

-- name: stats_rate
-- Candidates downloaded within :rate_window seconds, the span they are counted over (the
-- window, or less while the farm's first batch, archived or not, is younger), and the
-- database's clock.
SELECT COALESCE(sum(size) FILTER (
           WHERE downloaded_at > now() - make_interval(secs => :rate_window)), 0) AS recent,
       GREATEST(1.0, LEAST(CAST(:rate_window AS float8),
                           extract(epoch FROM now() - LEAST(
                               min(created_at),
                               (SELECT min(first_created_at) FROM archived_totals)))::float8))
           AS span_s,
       now() AS now
  FROM batches;

-- name: stats_throughput
-- Per minute of the last :minutes (the current one last, empty minutes as 0): candidates
-- and ok samples of the batches whose download completed in it. One pass over batches.
WITH recent AS (
    SELECT minute, sum(candidates) AS candidates, sum(ok) AS ok
      FROM (SELECT date_trunc('minute', downloaded_at) AS minute, size AS candidates,
                   COALESCE((outcomes ->> 'ok')::bigint, 0) AS ok
              FROM batches
             WHERE downloaded_at
                   >= date_trunc('minute', now()) - make_interval(mins => :minutes - 1)
            UNION ALL
            SELECT minute, candidates, ok FROM archived_minutes
             WHERE minute
                   >= date_trunc('minute', now()) - make_interval(mins => :minutes - 1)
           ) AS s
     GROUP BY 1
)
SELECT m.minute AS start, COALESCE(r.candidates, 0) AS candidates, COALESCE(r.ok, 0) AS ok
  FROM generate_series(date_trunc('minute', now()) - make_interval(mins => :minutes - 1),
                       date_trunc('minute', now()), interval '1 minute') AS m(minute)
  LEFT JOIN recent r ON r.minute = m.minute
 ORDER BY m.minute;

-- name: stats_similarity
-- The similarity histograms of the stored post-processing reports (hot and archived),
-- summed bin by bin for each set of edges (the reports of one farm normally share theirs).
SELECT edges, bin, sum(samples) AS samples
  FROM (SELECT b.postprocess -> 'similarity_edges' AS edges, c.bin, c.n::bigint AS samples
          FROM batches b,
               jsonb_array_elements_text(b.postprocess -> 'similarity_counts')
                   WITH ORDINALITY AS c(n, bin)
         WHERE b.postprocess IS NOT NULL
        UNION ALL
        SELECT edges, bin, samples FROM archived_similarity) AS s
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- Ingest statements run on a raw psycopg connection (COPY): "%(name)s" parameters.

-- name: ingest_session
-- A chunk's staged hashes stay in memory; set before the session's first temporary
-- table.
SET temp_buffers = '64MB';

-- name: ingest_id_sequence
-- candidates.id's identity sequence, quoted (coordinator.ingest.ids).
SELECT pg_get_serial_sequence('candidates', 'id');

-- name: ingest_lock_sequence
-- Changes nothing; locks the sequence against other sessions' nextval and setval until
-- the commit. An id block is one transaction: this, then ingest_reserve_ids.
ALTER SEQUENCE {sequence} INCREMENT BY 1;

-- name: ingest_reserve_ids
-- The first of %(count)s consecutive ids; the sequence moves past the last.
SELECT setval(%(sequence)s::regclass,
              nextval(%(sequence)s::regclass) + %(count)s - 1) - %(count)s + 1;

-- name: ingest_wave_share
-- Taken by each file's transaction first: no wave freezes while a file loads
-- (coordinator.ingest.waves). The key is pairfarm's own ('pfwave' in ASCII).
SELECT pg_advisory_xact_lock_shared(112102119097118101);

-- name: ingest_wave_exclusive
-- Taken by a freeze: waits for the files in flight; files that begin meanwhile wait.
SELECT pg_advisory_xact_lock(112102119097118101);

-- name: ingest_freezer_try
-- One freezer at a time across ingest processes: a session lock, released at the end of
-- the freeze or when its connection dies ('pffrez' in ASCII).
SELECT pg_try_advisory_lock(112102102114101122);

-- name: ingest_freezer_release
SELECT pg_advisory_unlock(112102102114101122);

-- name: ingest_frozen_waves
SELECT wave FROM url_waves WHERE frozen_at IS NOT NULL ORDER BY wave;

-- name: ingest_wave_bloom
SELECT bloom FROM url_waves WHERE wave = %(wave)s;

-- name: ingest_current_wave
SELECT wave, hashes FROM url_waves WHERE frozen_at IS NULL;

-- name: ingest_count_wave
-- At a file's end: the current wave's hashes, for the freeze's size check.
UPDATE url_waves SET hashes = hashes + %(inserted)s WHERE frozen_at IS NULL;

-- name: ingest_probe_frozen
-- The hashes a frozen wave holds among those its Bloom filter may hold; as bytea.
SELECT array_agg(uuid_send(h)) FROM {table} WHERE h = ANY(%(hashes)s::uuid[]);

-- name: ingest_wave_pages
SELECT pg_relation_size('url_hashes') / current_setting('block_size')::int;

-- name: ingest_wave_hashes
-- The current wave's hashes on heap pages [first, last), concatenated (a TID range scan).
SELECT string_agg(uuid_send(h), ''::bytea)
  FROM url_hashes
 WHERE ctid >= %(first)s::tid AND ctid < %(last)s::tid;

-- name: ingest_rename_wave
ALTER TABLE url_hashes RENAME TO {frozen};

-- name: ingest_rename_wave_key
ALTER INDEX url_hashes_pkey RENAME TO {frozen_key};

-- name: ingest_new_wave_table
-- The next wave's hashes; as in coordinator.models.UrlHash.
CREATE TABLE url_hashes (h uuid NOT NULL, CONSTRAINT url_hashes_pkey PRIMARY KEY (h));

-- name: ingest_freeze_wave
UPDATE url_waves SET frozen_at = now(), hashes = %(hashes)s, bloom = %(bloom)s
 WHERE wave = %(wave)s;

-- name: ingest_open_wave
INSERT INTO url_waves (wave) VALUES (%(wave)s);

-- name: ingest_copy_hashes
-- The dedup's cheap path: a chunk's URL hashes, sorted, straight into the current wave's
-- unique index (in a savepoint; a duplicate fails it, see ingest_insert_hashes).
COPY url_hashes (h) FROM STDIN (FORMAT binary);

-- name: ingest_staging
CREATE TEMPORARY TABLE ingest_hashes (h uuid NOT NULL) ON COMMIT DROP;

-- name: ingest_copy_staging
COPY ingest_hashes (h) FROM STDIN (FORMAT binary);

-- name: ingest_insert_hashes
-- Exact URL dedup for a chunk with duplicates: the first occurrence wins (earlier file,
-- earlier chunk); hashes already in url_hashes are skipped. Answers those, as bytea
-- (NULL when there are none); the loader drops their rows.
WITH inserted AS (
    INSERT INTO url_hashes (h)
    SELECT h FROM ingest_hashes
        ON CONFLICT DO NOTHING
    RETURNING h
)
SELECT array_agg(uuid_send(s.h))
  FROM ingest_hashes AS s
 WHERE NOT EXISTS (SELECT FROM inserted AS i WHERE i.h = s.h);

-- name: ingest_truncate
TRUNCATE ingest_hashes;

-- name: ingest_copy_candidates
-- The new candidates with the ids the loader took from the sequence (coordinator.ingest.ids).
COPY candidates (id, url, caption, language, ingest_id, extra) FROM STDIN (FORMAT binary);

-- name: ingest_copy_chunks
-- Their pending_chunks: CHUNK_SIZE consecutive ids a row with their lease payload's
-- fragments (coordinator.ingest.loader.chunk_fragments).
COPY pending_chunks (ids, url_j, caption_j, language_j, extra_j) FROM STDIN (FORMAT binary);

-- name: ingest_analyze
-- After a run: the tables' sizes (pg_class, which the lease's sampling reads) and the id
-- columns' statistics. The other columns are never filtered on; their statistics cost
-- 0.44 s of server CPU per 1M candidates where this costs 0.09 s.
ANALYZE candidates (id), pending_chunks (id);

-- name: ingest_insert_record
INSERT INTO ingests (source) VALUES (%(source)s) RETURNING id;

-- name: ingest_finish_record
UPDATE ingests
   SET rows_read = %(rows_read)s, inserted = %(inserted)s, duplicates = %(duplicates)s,
       rejected = %(rejected)s::jsonb, finished_at = now()
 WHERE id = %(ingest_id)s;

-- Archive statements (coordinator.archive) run on a raw psycopg connection (COPY):
-- "%(name)s" parameters.

-- name: archive_lock
-- One archive run at a time per database (pairfarm archive, the coordinators' automatic
-- mode): a session lock, released at the end of the run or when its connection dies.
-- The key is pairfarm's own ('pfarch' in ASCII).
SELECT pg_try_advisory_lock(112102097114099104) AS got;

-- name: archive_unlock
SELECT pg_advisory_unlock(112102097114099104);

-- name: archive_hot_candidates
-- Candidates in the hot tables: every one ingested, less those archived.
SELECT (SELECT COALESCE(sum(inserted), 0) FROM ingests)
       - (SELECT COALESCE(sum(candidates), 0) FROM archived_totals) AS hot;

-- name: archive_recorded
-- The files recorded in a folder: any other file there with an archive's name is garbage.
SELECT name FROM archives WHERE directory = %(directory)s;

-- name: archive_pick
-- The next file's batches: finished (their status in %(statuses)s: done, failed, and
-- downloaded in a farm without post-processing) and unchanged for %(min_age)s seconds,
-- in id order, as many as fit in %(max_candidates)s candidates (at least one), locked until
-- the run's transaction ends. A batch requeued meanwhile is rechecked after its lock and
-- left out; one that is locked waits (a requeue takes milliseconds).
SELECT id, size, status, outcomes::text, shard::text, attempts, pp_attempts, last_error,
       kept, dropped, downloaded_by, downloaded_at, done_at, updated_at
  FROM batches
 WHERE id = ANY (ARRAY(
           SELECT id FROM (
               SELECT id, sum(size) OVER (ORDER BY id) AS upto, size
                 FROM batches
                WHERE status = ANY(%(statuses)s)
                  AND updated_at < now() - make_interval(secs => %(min_age)s)) AS s
            WHERE upto <= %(max_candidates)s OR upto = size))
   AND status = ANY(%(statuses)s)
 ORDER BY id
   FOR UPDATE;

-- name: archive_copy
-- One batch's candidates in id order, as CSV for the parquet file (the batch's own
-- columns, from archive_pick, are added to each row by the writer).
COPY (
    SELECT c.id, c.url, c.caption, c.language, c.extra::text, c.ingest_id
      FROM candidates c
     WHERE c.id = ANY (CAST((SELECT ids FROM batch_members WHERE batch_id = %(batch_id)s)
                            AS bigint[]))
     ORDER BY c.id
) TO STDOUT (FORMAT csv);

-- name: archive_delete_candidates
-- A batch's candidates leave the hot tables (their URL hashes stay: the dedup holds).
DELETE FROM candidates
 WHERE id = ANY (CAST((SELECT ids FROM batch_members WHERE batch_id = %(batch_id)s)
                      AS bigint[]));

-- name: archive_record
INSERT INTO archives (directory, name, first_batch_id, last_batch_id, batches, candidates,
                      file_bytes)
VALUES (%(directory)s, %(name)s, %(first)s, %(last)s, %(batches)s, %(candidates)s,
        %(file_bytes)s);

-- name: archive_add_totals
INSERT INTO archived_totals (status, batches, candidates, bytes_downloaded, kept, dropped,
                             retried, first_created_at)
SELECT status, count(*), COALESCE(sum(size), 0), COALESCE(sum(bytes_downloaded), 0),
       COALESCE(sum(kept), 0), COALESCE(sum(dropped), 0), COALESCE(sum(retried), 0),
       min(created_at)
  FROM batches WHERE id = ANY (%(batch_ids)s)
 GROUP BY status
    ON CONFLICT (status) DO UPDATE
   SET batches = archived_totals.batches + EXCLUDED.batches,
       candidates = archived_totals.candidates + EXCLUDED.candidates,
       bytes_downloaded = archived_totals.bytes_downloaded + EXCLUDED.bytes_downloaded,
       kept = archived_totals.kept + EXCLUDED.kept,
       dropped = archived_totals.dropped + EXCLUDED.dropped,
       retried = archived_totals.retried + EXCLUDED.retried,
       first_created_at = LEAST(archived_totals.first_created_at, EXCLUDED.first_created_at);

-- name: archive_add_outcomes
INSERT INTO archived_outcomes (outcome, total)
SELECT o.key, sum(o.value::bigint)
  FROM batches b, jsonb_each_text(b.outcomes) AS o
 WHERE b.id = ANY (%(batch_ids)s) AND b.outcomes IS NOT NULL
 GROUP BY o.key
    ON CONFLICT (outcome) DO UPDATE SET total = archived_outcomes.total + EXCLUDED.total;

-- name: archive_add_minutes
INSERT INTO archived_minutes (minute, candidates, ok)
SELECT date_trunc('minute', downloaded_at), sum(size),
       sum(COALESCE((outcomes ->> 'ok')::bigint, 0))
  FROM batches
 WHERE id = ANY (%(batch_ids)s) AND downloaded_at IS NOT NULL
 GROUP BY 1
    ON CONFLICT (minute) DO UPDATE
   SET candidates = archived_minutes.candidates + EXCLUDED.candidates,
       ok = archived_minutes.ok + EXCLUDED.ok;

-- name: archive_add_worker_downloads
INSERT INTO archived_worker_downloads (worker_id, candidates)
SELECT downloaded_by, sum(size)
  FROM batches
 WHERE id = ANY (%(batch_ids)s) AND downloaded_by IS NOT NULL
 GROUP BY 1
    ON CONFLICT (worker_id) DO UPDATE
   SET candidates = archived_worker_downloads.candidates + EXCLUDED.candidates;

-- name: archive_add_similarity
INSERT INTO archived_similarity (edges, bin, samples)
SELECT b.postprocess -> 'similarity_edges', c.bin, sum(c.n::bigint)
  FROM batches b,
       jsonb_array_elements_text(b.postprocess -> 'similarity_counts')
           WITH ORDINALITY AS c(n, bin)
 WHERE b.id = ANY (%(batch_ids)s) AND b.postprocess -> 'similarity_edges' IS NOT NULL
 GROUP BY 1, 2
    ON CONFLICT (edges, bin) DO UPDATE
   SET samples = archived_similarity.samples + EXCLUDED.samples;

-- name: archive_delete_members
-- Last, once their totals are added: the batches' members, then the batches.
DELETE FROM batch_members WHERE batch_id = ANY (%(batch_ids)s);

-- name: archive_delete_batches
DELETE FROM batches WHERE id = ANY (%(batch_ids)s);

-- name: robots_lookup
-- The stored robots.txt answers of :origins still valid, with the seconds left by the
-- database's clock.
SELECT origin, kind, status, body,
       extract(epoch FROM expires_at - now())::float8 AS expires_in_s
  FROM robots_txt
 WHERE origin = ANY (CAST(:origins AS text[])) AND expires_at > now()
 ORDER BY origin;

-- name: robots_store
-- A worker's answers, one array element each; a newer answer replaces an older one.
INSERT INTO robots_txt (origin, kind, status, body, fetched_at, expires_at)
SELECT e.origin, e.kind, e.status, e.body, now(), now() + make_interval(secs => e.ttl_s)
  FROM unnest(CAST(:origins AS text[]), CAST(:kinds AS text[]), CAST(:statuses AS int[]),
              CAST(:bodies AS text[]), CAST(:ttls AS int[]))
           AS e(origin, kind, status, body, ttl_s)
    ON CONFLICT (origin) DO UPDATE
   SET kind = EXCLUDED.kind, status = EXCLUDED.status, body = EXCLUDED.body,
       fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at;

-- name: robots_purge_expired
-- Up to :n answers past their expiry, oldest first (each store removes a few).
DELETE FROM robots_txt
 WHERE origin IN (SELECT origin FROM robots_txt WHERE expires_at <= now()
                   ORDER BY expires_at LIMIT :n);
