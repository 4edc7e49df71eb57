"""The DICOM archive: its index, the header scan that feeds it, study aggregates and the worklist.

``tables`` defines the archive's tables (kept apart so the store layer can create the whole
schema); ``terms`` says how patients are keyed and which blind search terms C-FIND narrows by,
and ``upgrade`` brings an index written by an older medrelay up to date (both in the store
layer: ``Store.migrate`` runs the upgrade); ``index`` files instances (identity keys, terms,
sealed attributes) and answers C-FIND / C-MOVE / C-GET candidates; ``scan`` is the
header-only element walk; ``study`` records what each study has shown for ImagingStudy;
``worklist`` holds Modality Worklist items and their matching. The DICOM protocol itself
(associations, DIMSE) lives in listeners/ and routes/.
"""
