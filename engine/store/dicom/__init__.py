"""The DICOM archive: its index, the header scan that feeds it, study aggregates and the worklist.

``tables`` defines the archive's tables (kept apart so the store layer can create the whole
schema); ``index`` files instances (HMAC columns, sealed attributes) and answers C-FIND /
C-MOVE / C-GET candidates; ``scan`` is the header-only element walk; ``study`` records what
each study has shown for ImagingStudy; ``worklist`` holds Modality Worklist items and their
matching. The DICOM protocol itself (associations, DIMSE) lives in listeners/ and routes/.
"""
