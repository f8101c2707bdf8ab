//! Training: loop, optimizer, learning-rate schedule, loss scaler, metrics, logging.
