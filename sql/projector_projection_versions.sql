-- The versions of a projection beyond its first (see docs/operations.md#versions): 'building'
-- (started beside the live version, read models in their own schema), 'live' (the one readers
-- see through the readers' schema) or 'retired' (replaced by `projector promote`: its processes
-- stop, `projector retire` drops it). A projection with no row here has version 1 live, as
-- before versions existed; version 1 gets a row only once another version is promoted over it
-- (or it is promoted back). `projection` is the name the projection gives, without `@N`.
CREATE TABLE projector_projection_versions (
    projection TEXT NOT NULL,
    version INT NOT NULL CHECK (version > 0),
    state TEXT NOT NULL CHECK (state IN ('building', 'live', 'retired')),
    changed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, version)
);
