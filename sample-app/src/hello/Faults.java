package hello;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;
import java.util.concurrent.ThreadLocalRandom;

/**
 * What this instance is told to do wrong: a share of requests that fail with 500 and a delay
 * added to every request. The defaults are built in (WEB-INF/fault.properties, from
 * `build-sample-app --error-ratio --latency-ms`: a "bad version"); the file
 * /var/lib/hello/fault.properties, when present, overrides them at run time on this instance alone
 * (re-read at most once a second). The health check is never affected: a bad version passes
 * its gate and is caught by watching its traffic.
 */
final class Faults {
    static final Path RUNTIME = Path.of("/var/lib/hello/fault.properties");

    private final double builtInErrorRatio;
    private final long builtInLatencyMs;
    private volatile double errorRatio;
    private volatile long latencyMs;
    private volatile long checkedAt;
    private volatile long runtimeModified = -1;

    Faults(InputStream builtIn) throws IOException {
        Properties properties = new Properties();
        if (builtIn != null) {
            properties.load(builtIn);
        }
        builtInErrorRatio = ratio(properties.getProperty("error_ratio", "0"));
        builtInLatencyMs = millis(properties.getProperty("latency_ms", "0"));
        errorRatio = builtInErrorRatio;
        latencyMs = builtInLatencyMs;
    }

    /** Sleeps the added latency; true when this request is one to fail. */
    boolean apply() throws InterruptedException {
        refresh();
        if (latencyMs > 0) {
            Thread.sleep(latencyMs);
        }
        return errorRatio > 0 && ThreadLocalRandom.current().nextDouble() < errorRatio;
    }

    private void refresh() {
        long now = System.currentTimeMillis();
        if (now - checkedAt < 1000) {
            return;
        }
        checkedAt = now;
        try {
            long modified = Files.exists(RUNTIME) ? Files.getLastModifiedTime(RUNTIME).toMillis() : 0;
            if (modified == runtimeModified) {
                return;
            }
            runtimeModified = modified;
            if (modified == 0) {
                errorRatio = builtInErrorRatio;
                latencyMs = builtInLatencyMs;
                return;
            }
            Properties properties = new Properties();
            try (InputStream in = Files.newInputStream(RUNTIME)) {
                properties.load(in);
            }
            errorRatio = ratio(properties.getProperty("error_ratio", Double.toString(builtInErrorRatio)));
            latencyMs = millis(properties.getProperty("latency_ms", Long.toString(builtInLatencyMs)));
        } catch (IOException | RuntimeException e) {
            // A half-written or unreadable file keeps the last good settings.
        }
    }

    private static double ratio(String text) {
        double value = Double.parseDouble(text.trim());
        if (value < 0 || value > 1) {
            throw new IllegalArgumentException("error_ratio must be between 0 and 1: " + text);
        }
        return value;
    }

    private static long millis(String text) {
        long value = Long.parseLong(text.trim());
        if (value < 0) {
            throw new IllegalArgumentException("latency_ms must not be negative: " + text);
        }
        return value;
    }
}
