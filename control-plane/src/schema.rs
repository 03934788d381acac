// Mirrors migrations/postgres; keep the two in step.

diesel::table! {
    api_keys (id) {
        id -> Int8,
        name -> Text,
        key_hash -> Bytea,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    links (id) {
        id -> Int8,
        code -> Text,
        url -> Text,
        redirect_status -> Int2,
        expires_at -> Nullable<Timestamptz>,
        disabled -> Bool,
        is_alias -> Bool,
        created_by -> Nullable<Int8>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    link_outbox (id) {
        id -> Int8,
        code -> Text,
        created_at -> Timestamptz,
        processed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    idempotency_keys (api_key_id, idem_key) {
        api_key_id -> Int8,
        idem_key -> Text,
        request_hash -> Bytea,
        response_body -> Text,
        created_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(api_keys, links, link_outbox, idempotency_keys);
