"""The audit trail: recording what happened, rendering it as PS3.15 / ATNA, exporting it over syslog.

``trail`` writes rows into ``audit_events`` (inside the transaction of what they record where it
can), ``ps3_15`` renders a row as a DICOM PS3.15 A.5 audit message and classifies engine actions
into DCM event codes, ``syslog`` exports unexported rows over RFC 5424/5425 (TLS) and marks them
only after the write. It sits above the store it writes to and below everything that records.
"""
