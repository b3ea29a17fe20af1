"""ONNX Runtime, set up the one way this project runs models: sessions and execution providers
(``sessions``) and the error statistics every comparison uses (``metrics``). Calibration, the auto
search and verification all run models through here."""
