"""Streamline tractography on tensor images (DIPY, and MRtrix3's inputs), the uncertainty along
every streamline, tractogram files, and the comparison of tractograms with a reference."""
