"""The store: the only place that speaks SQL for the gateway's own tables.

One module per section, in the order a message meets them:

- `connection`: connect (WAL, synchronous=FULL), `Tx`, the write gate that lets the
  intake writer go first, and `run_on_thread`, the one use of aiosqlite's private API
- `schema`: the migrations runner
- `settings`: values kept with the data (the HMAC key)
- `intake`: `IntakeWriter` (group commit before the 250), dedup keys, spool files
- `inbound`: the inbound queue (`InboundRow`, claim, mark) and what the desk reads
  about one message (`InboundDetails`, `StoredReport`, the raw)
- `outbox`: queued mails (`OutboxRow`), the mailer's claims, answer caps, bounces
- `tickets`: `TicketRow`, create, update, find by number or thread Message-ID
- `thread`: a ticket's messages (`MessageRow`), history (`HistoryRow`) and
  attachments (`AttachmentRow`)
- `search`: `find_tickets` (status, assignee, full text, who waits)
- `paging`: `walk` a keyset-paged list in short read transactions
- `contracts`: `ContractRow`, repair hours per device
- `held`: mail held for operators (`HeldRow`)
- `health`: queue gauges and the write probe of /healthz
- `retention`: [storage] keep_raw

Rows come back as frozen dataclasses; the queue states are the StrEnums
`InboundState`, `OutboxStatus` and `HeldStatus` of `gateway.model`.
`from gateway import store; store.get_ticket(...)` reaches all of it.
"""

from gateway.errors import SchemaTooNewError, StoreError
from gateway.store.connection import (
    BUSY_TIMEOUT_MS,
    Tx,
    WriteGate,
    connect,
    gated,
    savepoint,
    iso,
    run_on_thread,
    share_write_gate,
    utcnow,
)
from gateway.store.contracts import (
    ContractRow,
    contract_hours,
    list_contracts,
)
from gateway.store.health import (
    QueueCounts,
    probe_write,
    queue_counts,
)
from gateway.store.held import (
    HeldRow,
    add_held,
    decide_held,
    get_held,
    held_of_inbound,
    iter_held,
    list_held,
)
from gateway.store.inbound import (
    InboundDetails,
    InboundRow,
    StoredReport,
    claim_inbound,
    claim_inbound_batch,
    queued_span,
    confirm_claim,
    count_inbound_by_state,
    get_inbound,
    inbound_details,
    inbound_report,
    iter_inbound,
    list_inbound,
    mark_inbound,
    processed_with_message_id,
    read_raw,
    recover_inbound,
    release_expired_inbound,
    renew_inbound_leases,
    requeue_inbound,
    store_cut_raw,
)
from gateway.store.intake import (
    RAW_CHUNK,
    IntakeWriter,
    Pending,
    Spool,
    Stored,
    body_digest,
    dedup_key,
    dedup_key_of,
    extract_message_id,
    header_block,
    sha256_of,
)
from gateway.store.outbox import (
    OutboxRow,
    address_key,
    answered,
    auto_replies_since,
    claim_due_outbox,
    enqueue_outbox,
    get_outbox,
    iter_outbox,
    last_outbox_id,
    list_outbox,
    mark_bounced,
    mark_outbox_failed,
    mark_outbox_retry,
    mark_outbox_sent,
    next_outbox_due,
    outbox_depth,
    outbox_for_inbound,
    outbox_sizes_since,
    read_outbox_raw,
    recover_outbox,
    release_expired_outbox,
    renew_outbox_lease,
    retry_outbox,
    sent_since,
)
from gateway.store.paging import (
    PAGE_ROWS,
    walk,
)
from gateway.store.retention import (
    drop_old_raw,
)
from gateway.store.schema import (
    Migration,
    check_schema,
    load_migrations,
    migrate,
    schema_version,
    split_statements,
)
from gateway.store.search import (
    ListedTicket,
    TicketCursor,
    find_tickets,
    iter_tickets,
    search_expression,
    ticket_cursor,
)
from gateway.store.settings import (
    setting,
)
from gateway.store.thread import (
    AttachmentRow,
    HistoryRow,
    MessageRow,
    add_history,
    add_ticket_message,
    replace_attachments,
    ticket_attachments,
    ticket_history,
    ticket_messages,
    ticket_of_inbound,
    ticket_thread,
)
from gateway.store.tickets import (
    TICKET_MAX,
    TICKET_MIN,
    TICKET_NUMBERS,
    NumberSpace,
    NumberSpaceExhausted,
    TicketRow,
    create_ticket,
    number_space,
    get_ticket,
    list_tickets,
    ticket_for_message_ids,
    update_ticket,
)

__all__ = [
    "renew_outbox_lease",
    "release_expired_outbox",
    "renew_inbound_leases",
    "release_expired_inbound",
    "confirm_claim",
    "BUSY_TIMEOUT_MS",
    "PAGE_ROWS",
    "RAW_CHUNK",
    "TICKET_MAX",
    "TICKET_MIN",
    "TICKET_NUMBERS",
    "NumberSpace",
    "NumberSpaceExhausted",
    "number_space",
    "AttachmentRow",
    "ContractRow",
    "HeldRow",
    "HistoryRow",
    "InboundDetails",
    "InboundRow",
    "IntakeWriter",
    "ListedTicket",
    "MessageRow",
    "Migration",
    "OutboxRow",
    "Pending",
    "QueueCounts",
    "SchemaTooNewError",
    "Spool",
    "StoreError",
    "Stored",
    "StoredReport",
    "TicketCursor",
    "TicketRow",
    "Tx",
    "WriteGate",
    "add_held",
    "add_history",
    "add_ticket_message",
    "address_key",
    "answered",
    "auto_replies_since",
    "body_digest",
    "check_schema",
    "claim_due_outbox",
    "claim_inbound",
    "claim_inbound_batch",
    "queued_span",
    "connect",
    "contract_hours",
    "count_inbound_by_state",
    "create_ticket",
    "decide_held",
    "dedup_key",
    "dedup_key_of",
    "drop_old_raw",
    "enqueue_outbox",
    "extract_message_id",
    "find_tickets",
    "gated",
    "savepoint",
    "get_held",
    "get_inbound",
    "get_outbox",
    "get_ticket",
    "header_block",
    "held_of_inbound",
    "inbound_details",
    "inbound_report",
    "iter_held",
    "iter_inbound",
    "iter_outbox",
    "iter_tickets",
    "iso",
    "last_outbox_id",
    "list_contracts",
    "list_held",
    "list_inbound",
    "list_outbox",
    "list_tickets",
    "load_migrations",
    "mark_bounced",
    "mark_inbound",
    "mark_outbox_failed",
    "mark_outbox_retry",
    "mark_outbox_sent",
    "migrate",
    "next_outbox_due",
    "outbox_depth",
    "outbox_for_inbound",
    "outbox_sizes_since",
    "probe_write",
    "processed_with_message_id",
    "queue_counts",
    "read_outbox_raw",
    "read_raw",
    "recover_inbound",
    "recover_outbox",
    "replace_attachments",
    "requeue_inbound",
    "retry_outbox",
    "run_on_thread",
    "schema_version",
    "search_expression",
    "sent_since",
    "setting",
    "sha256_of",
    "share_write_gate",
    "split_statements",
    "store_cut_raw",
    "ticket_attachments",
    "ticket_cursor",
    "ticket_for_message_ids",
    "ticket_history",
    "ticket_messages",
    "ticket_of_inbound",
    "ticket_thread",
    "update_ticket",
    "utcnow",
    "walk",
]
