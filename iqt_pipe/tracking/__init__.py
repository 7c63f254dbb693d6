"""Streamline tractography on tensor images: DIPY tracking and the uncertainty along every
streamline (:mod:`~iqt_pipe.tracking.track`), tractogram files (:mod:`~iqt_pipe.tracking.files`),
MRtrix3's inputs (:mod:`~iqt_pipe.tracking.mrtrix`) and the comparison of tractograms with a
reference (:mod:`~iqt_pipe.tracking.compare`)."""
