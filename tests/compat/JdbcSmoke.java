// PostgreSQL JDBC driver smoke test: server-side prepared statements, batches, COPY, cancel, transactions.
// Run as a single source file: java -cp /usr/share/java/postgresql.jar JdbcSmoke.java JDBC_URL USER PASSWORD
// Prints one `--- PASS|FAIL: name (seconds)` line per check, as `go test -v` does, for tests/compat/run.py.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcSmoke {
    interface Check {
        void run() throws Exception;
    }

    static String url;
    static Properties props = new Properties();
    // Per run, so targets sharing one database do not meet each other's tables.
    static final String SUFFIX = ProcessHandle.current().pid() + "_" + System.currentTimeMillis();

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(url, props);
    }

    static void expect(boolean condition, String what) {
        if (!condition) throw new AssertionError(what);
    }

    static void preparedStatements() throws Exception {
        try (Connection conn = connect();
             PreparedStatement ps = conn.prepareStatement("select ?::int + 1")) {
            // prepareThreshold=1: from the first run on the driver uses a named server-side statement.
            for (int n = 0; n < 10; n++) {
                ps.setInt(1, n);
                try (ResultSet rs = ps.executeQuery()) {
                    expect(rs.next() && rs.getInt(1) == n + 1, "prepared result for " + n);
                }
            }
            conn.setAutoCommit(false);
            ps.setInt(1, 41);
            try (ResultSet rs = ps.executeQuery()) {
                expect(rs.next() && rs.getInt(1) == 42, "prepared result inside a transaction");
            }
            conn.commit();
        }
    }

    static void batches() throws Exception {
        String table = "jdbc_batch_" + SUFFIX;
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int primary key, v text)");
            try {
                try (PreparedStatement ps = conn.prepareStatement("insert into " + table + " values (?, ?)")) {
                    for (int i = 0; i < 500; i++) {
                        ps.setInt(1, i);
                        ps.setString(2, "v" + i);
                        ps.addBatch();
                    }
                    int[] counts = ps.executeBatch();
                    expect(counts.length == 500, "batch update counts: " + counts.length);
                    ps.setInt(1, 7);
                    ps.setString(2, "again");
                    ps.addBatch();
                    String state = null;
                    try {
                        ps.executeBatch();
                    } catch (BatchUpdateException error) {
                        state = error.getSQLState();
                    }
                    expect("23505".equals(state), "duplicate key in a batch gives 23505, got " + state);
                }
                try (ResultSet rs = st.executeQuery("select count(*) from " + table)) {
                    expect(rs.next() && rs.getInt(1) == 500, "rows after the batches");
                }
            } finally {
                st.execute("drop table " + table);
            }
        }
    }

    static void copy() throws Exception {
        String table = "jdbc_copy_" + SUFFIX;
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int, v text)");
            try {
                StringBuilder data = new StringBuilder();
                for (int i = 0; i < 5000; i++) data.append(i).append("\trow ").append(i).append('\n');
                CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
                long copied = copy.copyIn("copy " + table + " from stdin", new StringReader(data.toString()));
                expect(copied == 5000, "COPY FROM row count " + copied);
                StringWriter out = new StringWriter();
                long sent = copy.copyOut("copy (select id from " + table + " order by id) to stdout", out);
                String[] lines = out.toString().trim().split("\n");
                expect(sent == 5000 && lines.length == 5000 && lines[4999].equals("4999"), "COPY TO lines");
            } finally {
                st.execute("drop table " + table);
            }
        }
    }

    static void cancel() throws Exception {
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(500);
                    st.cancel();
                } catch (Exception error) {
                    throw new RuntimeException(error);
                }
            });
            long startedMs = System.currentTimeMillis();
            canceller.start();
            String state = null;
            try {
                st.execute("select pg_sleep(30)");
            } catch (SQLException error) {
                state = error.getSQLState();
            }
            canceller.join();
            expect("57014".equals(state), "cancelled statement gives 57014, got " + state);
            expect(System.currentTimeMillis() - startedMs < 10000, "cancel took over 10 s");
            try (ResultSet rs = st.executeQuery("select 1")) {
                expect(rs.next() && rs.getInt(1) == 1, "query after cancel");
            }
        }
    }

    static void transactions() throws Exception {
        String table = "jdbc_tx_" + SUFFIX;
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int)");
            try {
                conn.setAutoCommit(false);
                st.execute("insert into " + table + " values (1)");
                conn.rollback();
                st.execute("insert into " + table + " values (2)");
                conn.commit();
                conn.setAutoCommit(true);
                try (ResultSet rs = st.executeQuery("select array_agg(id)::text from " + table)) {
                    expect(rs.next() && "{2}".equals(rs.getString(1)), "rows after rollback and commit");
                }
            } finally {
                conn.setAutoCommit(true);
                st.execute("drop table " + table);
            }
        }
    }

    public static void main(String[] args) {
        url = args[0];
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("prepareThreshold", "1");
        props.setProperty("socketTimeout", "20");
        props.setProperty("connectTimeout", "10");
        Map<String, Check> checks = new LinkedHashMap<>();
        checks.put("TestJdbcPreparedStatements", JdbcSmoke::preparedStatements);
        checks.put("TestJdbcBatches", JdbcSmoke::batches);
        checks.put("TestJdbcCopy", JdbcSmoke::copy);
        checks.put("TestJdbcCancel", JdbcSmoke::cancel);
        checks.put("TestJdbcTransactions", JdbcSmoke::transactions);
        int failed = 0;
        for (Map.Entry<String, Check> entry : checks.entrySet()) {
            System.out.println("=== RUN   " + entry.getKey());
            long startedMs = System.currentTimeMillis();
            String outcome = "PASS";
            try {
                entry.getValue().run();
            } catch (Throwable error) {
                outcome = "FAIL";
                failed++;
                System.out.println("    " + error);
            }
            System.out.printf("--- %s: %s (%.2fs)%n", outcome, entry.getKey(),
                    (System.currentTimeMillis() - startedMs) / 1000.0);
        }
        System.out.println(failed == 0 ? "PASS" : "FAIL");
        System.exit(failed == 0 ? 0 : 1);
    }
}
