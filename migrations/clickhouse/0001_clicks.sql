-- Click analytics: the raw events and two rollups the API reads.
-- Runs on ClickHouse 18.16 and on current releases. Every statement is
-- idempotent (IF NOT EXISTS), so a migration interrupted half-way, or run by
-- two sinks at once, is simply run again. Statements are separated by a
-- semicolon at the end of a line. All dates and times are UTC.

-- One row per redirect, written by the analytics sink.
CREATE TABLE IF NOT EXISTS clicks
(
    event_id      UUID,     -- unique per redirect, made by the edge
    code          String,   -- the short code followed
    ts            DateTime, -- when the edge answered (seconds)
    ts_ms         UInt64,   -- the same instant, Unix milliseconds
    date          Date,     -- UTC day of ts
    visitor_hash  UInt64,   -- keyed hash of address + User-Agent, salted per day
    ip            String,   -- visitor address; empty unless STORE_RAW_IP=true
    user_agent    String,
    referrer      String,   -- the Referer header, as sent
    referrer_host String,   -- its host, lower case; empty for direct visits
    country       String,   -- ISO 3166-1 alpha-2; empty when unknown
    browser       String,   -- e.g. Chrome, Firefox, Safari; empty when unknown
    os            String,   -- e.g. Windows 10, Mac OSX, Android, iPhone
    device        String,   -- desktop, mobile, appliance, bot or other
    is_bot        UInt8,    -- 1 for crawlers and other automated clients
    language      String    -- first tag of Accept-Language, lower case
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(date)
ORDER BY (code, ts);

-- Per link, day and bot flag: clicks, distinct visitor hashes, last click.
CREATE TABLE IF NOT EXISTS clicks_daily
(
    code     String,
    date     Date,
    is_bot   UInt8,
    clicks   AggregateFunction(count),
    visitors AggregateFunction(uniqExact, UInt64),
    last_ts  AggregateFunction(max, DateTime)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(date)
ORDER BY (code, date, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_daily_mv TO clicks_daily AS
SELECT
    code,
    date,
    is_bot,
    countState() AS clicks,
    uniqExactState(visitor_hash) AS visitors,
    maxState(ts) AS last_ts
FROM clicks
GROUP BY code, date, is_bot;

-- Per link, day and dimension value: human clicks (bots are left out).
-- dimension is one of referrer, country, browser, os, device.
CREATE TABLE IF NOT EXISTS clicks_by_dimension
(
    code      String,
    date      Date,
    dimension String,
    value     String,
    clicks    UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(date)
ORDER BY (code, date, dimension, value);

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_by_dimension_mv TO clicks_by_dimension AS
SELECT
    code,
    date,
    dim.1 AS dimension,
    dim.2 AS value,
    count() AS clicks
FROM clicks
ARRAY JOIN [
    ('referrer', referrer_host),
    ('country', country),
    ('browser', browser),
    ('os', os),
    ('device', device)
] AS dim
WHERE is_bot = 0
GROUP BY code, date, dimension, value;
