"""HL7 v2 as bytes on the wire: reading MSH and fields, charset decoding, escaping, ACKs, MLLP framing.

What belongs here is HL7 v2 itself, with no I/O: ``message`` reads the header cheaply and any
field lazily, ``ack`` builds and parses acknowledgements (original and enhanced mode, ERR per
version), ``mllp`` is the I/O-free MLLP de-framer shared by the listener, the sender and
``medrelay import``. The MLLP listener and sender (sockets) are components in listeners/ and
routes/; conversions to other standards are transforms. Imports nothing else of the engine, so
the router and every component can use it.
"""
