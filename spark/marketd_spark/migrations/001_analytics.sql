-- Warm storage of the Spark analytics jobs (spark/README.md documents every column).
-- Applied by the jobs' PostgreSQL sink at start-up or by `python spark/migrate.py --dsn ...`;
-- tracked in schema_migrations. Epoch-ms columns are bigint; prices and volumes exact numeric.

CREATE TABLE IF NOT EXISTS trade_aggregates (
    symbol            text          NOT NULL,
    interval          text          NOT NULL,
    window_start      bigint        NOT NULL,
    window_end        bigint        NOT NULL,
    open              numeric(18, 8) NOT NULL,
    high              numeric(18, 8) NOT NULL,
    low               numeric(18, 8) NOT NULL,
    close             numeric(18, 8) NOT NULL,
    volume            numeric(38, 8) NOT NULL,
    quote_volume      numeric(38, 16) NOT NULL,
    vwap              numeric(38, 16),
    trades_count      bigint        NOT NULL,
    taker_buy_volume  numeric(38, 8) NOT NULL,
    taker_sell_volume numeric(38, 8) NOT NULL,
    updated_at        timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, interval, window_start)
);

CREATE TABLE IF NOT EXISTS indicators (
    symbol      text           NOT NULL,
    interval    text           NOT NULL,
    open_time   bigint         NOT NULL,
    close       numeric(18, 8) NOT NULL,
    vwap        numeric(38, 16),
    -- {"sma_7": 1.0, ..., "bb_lower": null}: the column set follows the job's configured periods.
    "values"    jsonb          NOT NULL,
    updated_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, interval, open_time)
);

CREATE TABLE IF NOT EXISTS anomalies (
    symbol        text             NOT NULL,
    type          text             NOT NULL,
    window_start  bigint           NOT NULL,
    window_end    bigint           NOT NULL,
    observed      double precision NOT NULL,
    baseline      double precision NOT NULL,
    score         double precision NOT NULL,
    threshold     double precision NOT NULL,
    detected_at   bigint           NOT NULL,
    trade_id      bigint,
    -- Window anomalies have no trade: -1 stands for "none" in the key (trade ids are >= 0).
    anomaly_key   bigint GENERATED ALWAYS AS (coalesce(trade_id, -1)) STORED,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, type, window_start, anomaly_key)
);

CREATE INDEX IF NOT EXISTS anomalies_by_time ON anomalies (window_start DESC);
