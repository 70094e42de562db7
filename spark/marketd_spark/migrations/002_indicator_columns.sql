-- The indicator columns of the default periods as typed, queryable columns (spark/README.md).
-- The jsonb "values" stays the source (other periods need no migration); these columns are
-- generated from it, so the job writes nothing new and a replayed upsert keeps them in step.
-- A job run with other periods leaves the ones it does not compute null.

ALTER TABLE indicators
    ADD COLUMN IF NOT EXISTS sma_7 double precision
        GENERATED ALWAYS AS (("values" ->> 'sma_7')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS sma_25 double precision
        GENERATED ALWAYS AS (("values" ->> 'sma_25')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS sma_99 double precision
        GENERATED ALWAYS AS (("values" ->> 'sma_99')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS ema_7 double precision
        GENERATED ALWAYS AS (("values" ->> 'ema_7')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS ema_25 double precision
        GENERATED ALWAYS AS (("values" ->> 'ema_25')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS ema_99 double precision
        GENERATED ALWAYS AS (("values" ->> 'ema_99')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS rsi_14 double precision
        GENERATED ALWAYS AS (("values" ->> 'rsi_14')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS macd double precision
        GENERATED ALWAYS AS (("values" ->> 'macd')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS macd_signal double precision
        GENERATED ALWAYS AS (("values" ->> 'macd_signal')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS macd_hist double precision
        GENERATED ALWAYS AS (("values" ->> 'macd_hist')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS bb_upper double precision
        GENERATED ALWAYS AS (("values" ->> 'bb_upper')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS bb_middle double precision
        GENERATED ALWAYS AS (("values" ->> 'bb_middle')::double precision) STORED,
    ADD COLUMN IF NOT EXISTS bb_lower double precision
        GENERATED ALWAYS AS (("values" ->> 'bb_lower')::double precision) STORED;
